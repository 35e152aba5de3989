"""Shared service kit: settings, logging, telemetry, gRPC server runtime, Consul and Redis clients."""

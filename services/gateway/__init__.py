"""The gateway: one public door in front of every service (native gRPC and gRPC-Web), with routing over Consul,
load balancing, failover, canary weights, API keys and rate limits."""

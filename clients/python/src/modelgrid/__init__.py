"""modelgrid's protocol code and Python client.

- `modelgrid.client`: typed clients of the registry, the predictor (its own API and the Open Inference Protocol) and
  the trainer, sync and asyncio, with API keys, TLS and retries; numpy in and out.
- `modelgrid.<service>.v1`: the protobuf messages and gRPC stubs generated from the repository's protos/;
  `modelgrid.oip`: the Open Inference Protocol's (proto package `inference`).
"""

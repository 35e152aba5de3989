#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and .pyi type stubs from protos/ into clients/python/src/modelgrid/
# (git-ignored), the package of the modelgrid-client distribution that the services install too.
# The code is imported by its proto package path: `from modelgrid.registry.v1 import registry_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" clients/python/generate_protos.py

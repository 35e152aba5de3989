#!/usr/bin/env bash
# Generates Python messages, gRPC stubs and .pyi type stubs from protos/ into gen/ (git-ignored).
# The code is imported by its proto package path: `from modelgrid.registry.v1 import registry_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf gen.new && mkdir -p gen.new
"$PY" -m grpc_tools.protoc -Iprotos --python_out=gen.new --pyi_out=gen.new --grpc_python_out=gen.new \
  $(find protos -name '*.proto' | sort)
find gen.new -mindepth 1 -type d -exec touch {}/__init__.py \;
rm -rf gen && mv gen.new gen
touch gen/.generated

#!/usr/bin/env bash
# Generates the Python code (messages, gRPC stubs, mypy stubs) for protos/epochlens/v1/*.proto.
# Usage: scripts/gen_protos.sh [OUT_DIR]   (default: protos, next to the .proto files)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protos}"
py="${PYTHON:-python}"
common_protos="$("$py" -c 'import os, google.rpc.status_pb2 as m; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')"
mkdir -p "$out/epochlens/v1"
"$py" -m grpc_tools.protoc -Iprotos -I"$common_protos" \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/epochlens/v1/*.proto
touch "$out/epochlens/__init__.py" "$out/epochlens/v1/__init__.py"

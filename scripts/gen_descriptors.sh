#!/usr/bin/env bash
# Builds the self-contained FileDescriptorSet of protos/epochlens/v1/*.proto: every file with
# its imports (google/protobuf/*, google/rpc/*) and source info (comments), so any language's
# tooling (buf, grpcurl -protoset, @grpc/proto-loader) loads the contracts without an include path.
# Usage: scripts/gen_descriptors.sh [OUT_FILE] [PROTO_ROOT]
#   (defaults: protos/epochlens.binpb, built from the .proto files under protos)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-protos/epochlens.binpb}"
root="${2:-protos}"
py="${PYTHON:-python}"
common_protos="$("$py" -c 'import os, google.rpc.status_pb2 as m; print(os.path.dirname(os.path.dirname(os.path.dirname(m.__file__))))')"
mkdir -p "$(dirname "$out")"
"$py" -m grpc_tools.protoc -I"$root" -I"$common_protos" \
  --include_imports --include_source_info --descriptor_set_out="$out" \
  "$root"/epochlens/v1/*.proto

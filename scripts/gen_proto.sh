#!/usr/bin/env bash
# Regenerate the Python gRPC stubs of the asyncfl service from its .proto files.
# The generated *_pb2.py, *_pb2.pyi and *_pb2_grpc.py files are committed; a test
# (tests/test_service_proto.py) fails when they are out of date.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
PROTO_ROOT="$ROOT/src/asyncfl/service/proto"
OUT="${1:-$PROTO_ROOT}"
cd "$PROTO_ROOT"
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  asyncfl/v1/*.proto
# protoc writes absolute imports (`from asyncfl.v1 import ...`); the stubs live inside the
# asyncfl package, so make them relative to stay importable from any working directory
# (internal.proto imports service.proto, so its message module and type stub import too).
sed -i -E 's/^from asyncfl\.v1 import (\w+) as/from . import \1 as/' "$OUT"/asyncfl/v1/*_pb2*.py*

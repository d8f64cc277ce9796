"""Generated gRPC stubs of the asyncfl service protocol (see scripts/gen_proto.sh)."""

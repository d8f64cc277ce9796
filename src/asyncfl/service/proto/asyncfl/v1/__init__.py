"""``asyncfl.v1``: the service protocol, version 1 (generated; do not edit)."""

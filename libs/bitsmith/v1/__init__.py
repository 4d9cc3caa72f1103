"""Generated protobuf and gRPC stubs of `proto/bitsmith/v1` (never edit: `make proto` rewrites them).

They live at `bitsmith.v1` because that is the proto package, so the generated imports
(`from bitsmith.v1 import common_pb2`) resolve without rewriting.
"""

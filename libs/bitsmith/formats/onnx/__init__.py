"""ONNX graphs whose linears are `com.microsoft::MatMulNBits`, for ONNX Runtime on any CPU."""

from bitsmith.formats.onnx.reader import OnnxCheckpoint, read_onnx
from bitsmith.formats.onnx.writer import write_onnx

write = write_onnx
read = read_onnx

__all__ = ["OnnxCheckpoint", "read", "read_onnx", "write", "write_onnx"]

"""AutoAWQ "GEMM" safetensors checkpoints (4-bit, packed along the output dim) as vLLM and transformers load them."""

from bitsmith.formats.awq.reader import AWQCheckpoint, read_awq
from bitsmith.formats.awq.writer import write_awq

write = write_awq
read = read_awq

__all__ = ["AWQCheckpoint", "read", "read_awq", "write", "write_awq"]

"""GPTQ safetensors checkpoints (AutoGPTQ / GPTQModel layout) as transformers and vLLM load them."""

from bitsmith.formats.gptq.reader import GPTQCheckpoint, read_gptq
from bitsmith.formats.gptq.writer import write_gptq

write = write_gptq
read = read_gptq

__all__ = ["GPTQCheckpoint", "read", "read_gptq", "write", "write_gptq"]

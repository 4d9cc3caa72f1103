"""compressed-tensors "pack-quantized" (int) and "float-quantized" (FP8 W8A8) safetensors, as llm-compressor writes
and vLLM / transformers load them."""

from bitsmith.formats.compressed_tensors.reader import CompressedTensorsCheckpoint, read_compressed_tensors
from bitsmith.formats.compressed_tensors.writer import write_compressed_tensors

write = write_compressed_tensors
read = read_compressed_tensors

__all__ = ["CompressedTensorsCheckpoint", "read", "read_compressed_tensors", "write", "write_compressed_tensors"]

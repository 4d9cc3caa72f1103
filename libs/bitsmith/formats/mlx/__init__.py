"""mlx-lm's quantized safetensors (uint32-packed codes, scales and biases per group), for Apple silicon."""

from bitsmith.formats.mlx.reader import MlxCheckpoint, read_mlx
from bitsmith.formats.mlx.writer import write_mlx

write = write_mlx
read = read_mlx

__all__ = ["MlxCheckpoint", "read", "read_mlx", "write", "write_mlx"]

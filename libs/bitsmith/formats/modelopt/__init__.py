"""NVIDIA ModelOpt's "unified HF" checkpoint (hf_quant_config.json + HF-named safetensors): FP8 or W4A16 AWQ."""

from bitsmith.formats.modelopt.reader import ModelOptCheckpoint, read_modelopt
from bitsmith.formats.modelopt.writer import write_modelopt

write = write_modelopt
read = read_modelopt

__all__ = ["ModelOptCheckpoint", "read", "read_modelopt", "write", "write_modelopt"]

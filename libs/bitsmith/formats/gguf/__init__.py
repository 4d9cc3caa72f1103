"""One GGUF file as llama.cpp loads it, in llama-quantize's named tensor-type mixes (FORMATS.md §5).

`write` takes block linears solved onto the ggml types their mix assigns (`linear_types` gives them);
`validate` checks a file at the byte level before llama.cpp (which aborts on malformed input) sees it;
`read` returns its config and dense weights.
"""

from bitsmith.formats.gguf.layout import Layout, TensorRecord, gguf_file, validate
from bitsmith.formats.gguf.mixes import ALIASES, DEFAULT_MIX, MIXES, Mix, get_mix, linear_types, mix_names
from bitsmith.formats.gguf.reader import GGUFCheckpoint, read_gguf
from bitsmith.formats.gguf.writer import write_gguf

write = write_gguf
read = read_gguf

__all__ = [
    "ALIASES",
    "DEFAULT_MIX",
    "MIXES",
    "GGUFCheckpoint",
    "Layout",
    "Mix",
    "TensorRecord",
    "get_mix",
    "gguf_file",
    "linear_types",
    "mix_names",
    "read",
    "read_gguf",
    "validate",
    "write",
    "write_gguf",
]

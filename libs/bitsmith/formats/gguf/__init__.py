"""One GGUF file as llama.cpp loads it, in llama-quantize's named tensor-type mixes (FORMATS.md §5).

`write` takes block linears solved onto the ggml types their mix assigns (`linear_types` gives them);
`validate` checks a file at the byte level before llama.cpp (which aborts on malformed input) sees it;
`read` returns its config and dense weights.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from bitsmith.formats.gguf.layout import Layout, TensorRecord, gguf_file, validate
from bitsmith.formats.gguf.mixes import ALIASES, DEFAULT_MIX, MIXES, Mix, get_mix, linear_types, mix_names

if TYPE_CHECKING:
    from bitsmith.formats.gguf.reader import GGUFCheckpoint, read_gguf
    from bitsmith.formats.gguf.writer import write_gguf

    write = write_gguf
    read = read_gguf

_LAZY = {"GGUFCheckpoint": "reader", "read_gguf": "reader", "read": "reader", "write_gguf": "writer",
         "write": "writer"}
"""Names whose modules import torch, loaded on first use: the llama.cpp worker process imports this package
(for `layout`) and must start without torch."""


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    member = {"read": "read_gguf", "write": "write_gguf"}.get(name, name)
    return getattr(import_module(f"{__name__}.{module}"), member)

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

"""The format registry: `Format` → (writer, reader), so services never branch on the format.

Members are listed here by name and imported only when asked for (format modules import torch and
safetensors; importing `bitsmith.formats` must stay cheap for the coordinator).

>>> handler = get_format(Format.GPTQ)
>>> handler.write.__name__, handler.read.__name__
('write_gptq', 'read_gptq')
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import MappingProxyType

from bitsmith.errors import UnsupportedError
from bitsmith.formats.base import Reader, Writer
from bitsmith.schemes import Format

_MEMBERS = MappingProxyType({
    Format.GPTQ: "bitsmith.formats.gptq",
    Format.ONNX: "bitsmith.formats.onnx",
    Format.MLX: "bitsmith.formats.mlx",
    Format.AWQ: "bitsmith.formats.awq",
    Format.COMPRESSED_TENSORS: "bitsmith.formats.compressed_tensors",
    Format.GGUF: "bitsmith.formats.gguf",
    Format.MODELOPT: "bitsmith.formats.modelopt",
    Format.TRTLLM: "bitsmith.formats.trtllm",
})
"""Format → module exposing `write` and `read` (checked by a test to cover every `Format`)."""


@dataclass(frozen=True, slots=True)
class FormatHandler:
    """The writer and reader of one format."""

    format: Format
    write: Writer
    read: Reader


def get_format(fmt: Format) -> FormatHandler:
    """The handler of `fmt`; `UnsupportedError` listing the known formats if it has none."""
    module_name = _MEMBERS.get(fmt) if fmt in Format.__members__.values() else None
    if module_name is None:
        known = ", ".join(sorted(str(f) for f in _MEMBERS))
        raise UnsupportedError(f"no writer/reader for format {fmt!r}; known formats: {known}")
    module = import_module(module_name)
    return FormatHandler(format=Format(fmt), write=module.write, read=module.read)


def known_formats() -> tuple[Format, ...]:
    """Every format with a registered writer and reader."""
    return tuple(_MEMBERS)


def preload() -> dict[Format, str]:
    """Import the transformers model code that writers build models from
    (`bitsmith.formats.gptq.writer.linear_names`) and every format's module, so that no later call waits for
    them; returns the formats whose module could not be imported, with the reason.

    Why: a process imports them on its first write otherwise, and on a GPU host torch (with CUDA) and
    transformers' model base (tensor parallelism, generation, kernel hubs) take about 10 s to import, all
    of it inside a job's last step. A packer imports them as it starts instead. A format whose optional
    dependency is missing (`gguf` on a host that writes safetensors only) is skipped, not fatal: the others
    still load, and a job asking for it fails at its Pack with the import's own error.
    """
    from bitsmith import models

    models.preload()
    missing: dict[Format, str] = {}
    for fmt in _MEMBERS:
        try:
            get_format(fmt)
        except ImportError as exc:
            missing[fmt] = str(exc)
    return missing

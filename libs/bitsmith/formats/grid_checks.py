"""Checks every integer-grid format's writer makes before it packs `QuantizedWeight`s.

Why shared: each format carries a subset of what solvers produce (some bit widths, some group sizes,
one scheme per file for some, no act-order permutation), and refusing the rest must read the same way
everywhere: `UnsupportedError` for valid codes the format cannot hold, `FormatError` for codes that
are not what `QuantizedWeight` promises, both naming the format and the layer. Formats that hold one
scheme per layer (mixed precision) check each layer with `check_schemes`; formats with one scheme per
file use `single_scheme`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import ConfigError, FormatError, NotFoundError, UnsupportedError
from bitsmith.formats.base import read_json_object, require_layers
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, QuantScheme


def unquantized_config(source_model_dir: Path, *, markers: Collection[str]) -> dict[str, Any]:
    """The source's config.json as a dict; `UnsupportedError` if any of `markers` says it is already quantized."""
    try:
        config = read_json_object(source_model_dir / "config.json")
    except FileNotFoundError as e:
        raise NotFoundError(f"source model {source_model_dir} has no config.json") from e
    if found := sorted(set(markers) & set(config)):
        raise UnsupportedError(f"source model {source_model_dir} is already quantized ({found[0]} in config.json)")
    return config


def check_scheme(
    scheme: QuantScheme, *, fmt: str, bits: Collection[int], group_sizes: Collection[int], layer: str | None = None
) -> None:
    """`UnsupportedError` if `fmt` cannot carry `scheme`; the message names `layer` when given."""
    subject = f"{fmt}: quantized layer {layer!r}: " if layer is not None else ""
    if scheme.bits not in bits:
        raise UnsupportedError(f"{subject}the {fmt} format carries {sorted(bits)}-bit codes, not {scheme.bits}-bit")
    if scheme.group_size == PER_CHANNEL:
        raise UnsupportedError(
            f"{subject}the {fmt} format needs groups of {sorted(group_sizes)} columns; per-channel scales are "
            "not supported"
        )
    if scheme.group_size not in group_sizes:
        raise UnsupportedError(
            f"{subject}the {fmt} format takes group sizes {sorted(group_sizes)}, not {scheme.group_size}"
        )


def check_schemes(
    quantized: Mapping[str, QuantizedWeight], *, fmt: str, bits: Collection[int], group_sizes: Collection[int]
) -> None:
    """Every layer's own scheme is one `fmt` can carry (mixed precision); `UnsupportedError` naming the layer.

    The caller picks the global scheme (`bitsmith.formats.gptq.dynamic.default_scheme`) and records the others.
    """
    require_layers(quantized, fmt)
    for name, qw in sorted(quantized.items()):
        check_scheme(qw.scheme, fmt=fmt, bits=bits, group_sizes=group_sizes, layer=name)


def single_scheme(
    quantized: Mapping[str, QuantizedWeight], *, fmt: str, bits: Collection[int], group_sizes: Collection[int]
) -> QuantScheme:
    """The one scheme all layers share, if `fmt` can carry it; `UnsupportedError` saying why not."""
    require_layers(quantized, fmt)
    by_scheme: dict[QuantScheme, list[str]] = {}
    for name, qw in sorted(quantized.items()):
        by_scheme.setdefault(qw.scheme, []).append(name)
    if len(by_scheme) > 1:
        detail = "; ".join(f"{s} for {names[0]} (+{len(names) - 1} more)" for s, names in by_scheme.items())
        raise UnsupportedError(f"the {fmt} format holds one scheme, but the layers use {len(by_scheme)}: {detail}")
    scheme = next(iter(by_scheme))
    check_scheme(scheme, fmt=fmt, bits=bits, group_sizes=group_sizes)
    return scheme


def check_source_weight(where: str, name: str, qw: QuantizedWeight, source_shape: tuple[int, ...] | None) -> None:
    """The source checkpoint has a 2-D `name`.weight of exactly the codes' shape (`ConfigError` otherwise)."""
    if source_shape is None or len(source_shape) != 2:
        raise ConfigError(f"{where}: the source checkpoint has no 2-D {name}.weight")
    if tuple(source_shape) != qw.shape:
        raise ConfigError(f"{where}: source weight is {list(source_shape)}, codes are {list(qw.shape)}")


def check_layer(name: str, qw: QuantizedWeight, source_shape: tuple[int, ...] | None, *, fmt: str) -> None:
    """One layer fits its source linear, its groups are contiguous, and its numbers are in range."""
    where = f"{fmt}: quantized layer {name!r}"
    check_source_weight(where, name, qw, source_shape)
    scheme, (_, k) = qw.scheme, qw.shape
    group_size = scheme.effective_group_size(k)
    if k % group_size:
        raise UnsupportedError(f"{where}: group_size {scheme.group_size} does not divide in_features {k}")
    if not torch.equal(qw.g_idx.to(torch.int64), torch.arange(k) // group_size):
        raise UnsupportedError(
            f"{where}: g_idx is not arange(K)//group_size (act-order); the {fmt} format stores contiguous "
            "groups only — quantize without act_order, or with static_groups"
        )
    _check_range(where, "codes", qw.codes, 0, scheme.maxq)
    mid = 1 << (scheme.bits - 1)
    low, high = (mid, mid) if scheme.sym else (0, scheme.maxq)
    _check_range(where, "symmetric zeros" if scheme.sym else "zeros", qw.zeros, low, high)
    if not torch.isfinite(qw.scales).all():
        raise FormatError(f"{where}: scales are not finite")


def _check_range(where: str, what: str, values: torch.Tensor, low: int, high: int) -> None:
    if values.is_floating_point():
        raise FormatError(f"{where}: {what} must be integers, got {values.dtype}")
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        raise FormatError(f"{where}: {what} span [{int(values.min())}, {int(values.max())}], allowed [{low}, {high}]")

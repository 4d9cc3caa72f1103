"""What the NVIDIA formats (ModelOpt unified HF and TensorRT-LLM) can hold, checked before anything is written.

Why shared: both formats name one `quant_algo` per checkpoint, and it decides every quantized linear's
tensors; the two writers must refuse the same inputs with the same words. A checkpoint holds either FP8
linears or int4 linears, never both (ModelOpt would call that MIXED_PRECISION with a per-layer
`quant_cfg.json`, which bitsmith does not write):

* FP8 (`FP8Weight`): one `FP8Scheme` for all layers, mapped to ModelOpt's names — per-tensor weights with
  static per-tensor activations are "FP8", per-channel weights with dynamic per-token activations are
  "FP8_PER_CHANNEL_PER_TOKEN". The two other combinations have no algorithm name in ModelOpt or
  TensorRT-LLM and are refused.
* int4 (`QuantizedWeight`): 4-bit, symmetric (zero 8: ModelOpt writes `has_zero_point: false` and has no
  zero tensor), contiguous groups (no act-order permutation: the format has no g_idx), a group size of
  `INT4_GROUP_SIZES`, an even number of output rows (two rows share a byte). "W4A16_AWQ" names the kernel
  path, not the solver: symmetric GPTQ or RTN codes are the same grid, and bitsmith's AWQ scales are
  already folded into the preceding ops, so `pre_quant_scale` is false.
* ggml blocks (`GGMLWeight`) are refused by name.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats.base import require_layers
from bitsmith.formats.grid_checks import check_layer
from bitsmith.formats.modelopt.constants import (
    ALGO_FP8,
    ALGO_FP8_PER_CHANNEL_PER_TOKEN,
    ALGO_W4A16_AWQ,
    INT4_BITS,
    INT4_GROUP_SIZES,
)
from bitsmith.quantized import FP8Weight, Quantized, QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, FP8Scheme, QuantScheme


@dataclass(frozen=True, slots=True, kw_only=True)
class NvidiaPlan:
    """The checkpoint-wide algorithm the solved layers fit: `quant_algo` and, for int4, its group size."""

    quant_algo: str
    fp8: FP8Scheme | None = None
    int4: QuantScheme | None = None

    @property
    def group_size(self) -> int | None:
        return self.int4.group_size if self.int4 is not None else None


def fp8_algo(scheme: FP8Scheme) -> str | None:
    """ModelOpt's name for an FP8 scheme, or None where it has none."""
    if not scheme.per_channel and scheme.static_activations:
        return ALGO_FP8
    if scheme.per_channel and not scheme.static_activations:
        return ALGO_FP8_PER_CHANNEL_PER_TOKEN
    return None


def fp8_scheme(algo: str) -> FP8Scheme:
    """The inverse of `fp8_algo` for the two FP8 names."""
    return FP8Scheme(per_channel=algo == ALGO_FP8_PER_CHANNEL_PER_TOKEN, static_activations=algo == ALGO_FP8)


def _first(names: Sequence[str]) -> str:
    return f"{names[0]!r}" + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")


def plan(quantized: Mapping[str, Quantized], fmt: str) -> NvidiaPlan:
    """The one algorithm all layers share (see the module docstring); refusals name a layer."""
    require_layers(quantized, fmt)
    by_kind: dict[str, list[str]] = {}
    for name, weight in sorted(quantized.items()):
        if isinstance(weight, FP8Weight):
            by_kind.setdefault("fp8", []).append(name)
        elif isinstance(weight, QuantizedWeight):
            by_kind.setdefault("int", []).append(name)
        else:
            raise FormatError(f"{fmt}: {name} was solved onto the {weight.scheme.label} grid, which {fmt} cannot "
                              "store; it needs an FP8 or a symmetric int4 solve")
    if len(by_kind) > 1:
        raise UnsupportedError(
            f"{fmt}: layers mix FP8 ({_first(by_kind['fp8'])}) and integer grids ({_first(by_kind['int'])}); "
            "one checkpoint holds one quant_algo (bitsmith does not write MIXED_PRECISION)")
    if "fp8" in by_kind:
        schemes: dict[FP8Scheme, list[str]] = {}
        for name in by_kind["fp8"]:
            schemes.setdefault(quantized[name].scheme, []).append(name)  # type: ignore[arg-type]
        for scheme, names in schemes.items():
            if fp8_algo(scheme) is None:
                raise UnsupportedError(
                    f"{fmt}: {scheme.label} (layer {_first(names)}) has no ModelOpt / TensorRT-LLM algorithm: "
                    f"{ALGO_FP8} is per-tensor weights with static activations, {ALGO_FP8_PER_CHANNEL_PER_TOKEN} "
                    "per-channel weights with dynamic per-token activations")
        if len(schemes) > 1:
            detail = "; ".join(f"{s.label} for {_first(n)}" for s, n in schemes.items())
            raise UnsupportedError(f"{fmt}: the checkpoint holds one quant_algo, but the layers use {detail}")
        scheme = next(iter(schemes))
        return NvidiaPlan(quant_algo=str(fp8_algo(scheme)), fp8=scheme)
    int_schemes: dict[QuantScheme, list[str]] = {}
    for name in by_kind["int"]:
        int_schemes.setdefault(quantized[name].scheme, []).append(name)  # type: ignore[arg-type]
    for int_scheme, names in int_schemes.items():
        if problem := _int4_problem(int_scheme):
            raise UnsupportedError(f"{fmt}: {problem}: layer {_first(names)}")
    if len(int_schemes) > 1:
        detail = "; ".join(f"{s.label} for {_first(n)}" for s, n in int_schemes.items())
        raise UnsupportedError(f"{fmt}: the checkpoint holds one scheme, but the layers use {detail}")
    return NvidiaPlan(quant_algo=ALGO_W4A16_AWQ, int4=next(iter(int_schemes)))


def _int4_problem(scheme: QuantScheme) -> str | None:
    if scheme.bits != INT4_BITS:
        return f"{ALGO_W4A16_AWQ} holds 4-bit codes only, not {scheme.bits}-bit"
    if not scheme.sym:
        return (f"asymmetric grids cannot be stored: {ALGO_W4A16_AWQ} is written with has_zero_point false "
                "(ModelOpt's only int4 layout has no zero tensor); quantize with sym")
    if scheme.group_size == PER_CHANNEL:
        return f"per-channel scales (group_size -1) are not an int4 block size; use one of {list(INT4_GROUP_SIZES)}"
    if scheme.group_size not in INT4_GROUP_SIZES:
        return f"group_size {scheme.group_size} is not one of {list(INT4_GROUP_SIZES)}"
    return None


def check_fp8_layer(name: str, weight: FP8Weight, source_shape: tuple[int, ...] | None, fmt: str) -> None:
    """An FP8 layer fits its source linear and holds only finite, positive numbers."""
    where = f"{fmt}: quantized layer {name!r}"
    if source_shape is None or len(source_shape) != 2:
        raise ConfigError(f"{where}: the source checkpoint has no 2-D {name}.weight")
    if tuple(source_shape) != weight.shape:
        raise ConfigError(f"{where}: source weight is {list(source_shape)}, FP8 data is {list(weight.shape)}")
    if not torch.isfinite(weight.data.float()).all():
        raise FormatError(f"{where}: FP8 data holds NaN")
    for what, scale in (("scale", weight.scale), ("input_scale", weight.input_scale)):
        if scale is not None and not (torch.isfinite(scale).all() and (scale > 0).all()):
            raise FormatError(f"{where}: {what} must be finite and positive")


def check_int4_layer(name: str, qw: QuantizedWeight, source_shape: tuple[int, ...] | None, fmt: str) -> None:
    """An int4 layer fits its source linear, has contiguous groups, codes in range, zeros of 8, an even
    number of rows (two rows share a byte) and finite scales."""
    check_layer(name, qw, source_shape, fmt=fmt)
    if qw.shape[0] % 2:
        raise UnsupportedError(f"{fmt}: quantized layer {name!r}: out_features {qw.shape[0]} is odd; two output "
                               "rows share one byte")


def check_layers(quantized: Mapping[str, Quantized], shapes: Mapping[str, tuple[int, ...] | None], fmt: str) -> None:
    """`check_fp8_layer` / `check_int4_layer` for every layer (after `plan`)."""
    for name, weight in sorted(quantized.items()):
        if isinstance(weight, FP8Weight):
            check_fp8_layer(name, weight, shapes.get(name), fmt)
        elif isinstance(weight, QuantizedWeight):
            check_int4_layer(name, weight, shapes.get(name), fmt)


def check_names(quantized: Collection[str], blocks: Collection[str], linears: Collection[str], fmt: str) -> None:
    """Only decoder-block linears are quantized (the LM head stays float, as ModelOpt exports it)."""
    outside = sorted(set(quantized) - set(blocks))
    if not outside:
        return
    if not_linear := [name for name in outside if name not in linears]:
        raise ConfigError(f"{fmt}: quantized layer {not_linear[0]!r} is not an nn.Linear of the source model")
    raise UnsupportedError(f"{fmt}: quantized layer {outside[0]!r} is outside the decoder blocks; the LM head "
                           "and embeddings stay float")


def check_fused_groups(groups: Iterable[Sequence[str]], quantized: Collection[str], fmt: str) -> None:
    """Linears that read one input (q/k/v, gate/up) are fused by TensorRT-LLM and vLLM into one layer with
    one quantization: a group quantized in part is refused."""
    for group in groups:
        done = [name for name in group if name in quantized]
        if done and len(done) != len(group):
            rest = [name for name in group if name not in quantized]
            raise UnsupportedError(f"{fmt}: {done} are quantized but {rest} are not; consumers fuse linears that "
                                   "read the same input into one layer and need all or none of them quantized")

"""Write a GPTQ safetensors checkpoint (FORMATS.md §1) from a source model and solver results.

Why it validates so much: the format has one global (bits, group_size, sym, desc_act) plus per-module
`dynamic` overrides, and consumers trust every shape, so a wrong layer name or an out-of-range code
would produce a checkpoint that loads and silently computes garbage. Every such input is refused here with the layer
named, before the first byte is written.

The writer fills an existing empty directory (a staging directory from `bitsmith.manifest.
build_artifact`); it never publishes. Non-quantized tensors are copied with their name and dtype,
byte for byte; each quantized linear's `.weight` is replaced by qweight / qzeros / scales / g_idx
(and its bias becomes fp16).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import bitsmith
from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats.base import check_writer_inputs, copy_present_files, integer_weights
from bitsmith.formats.gptq.constants import (
    CONFIG_FILE,
    COPIED_FILES,
    DEFAULT_MAX_SHARD_BYTES,
    G_IDX,
    LM_HEAD,
    PACK_DTYPE,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    QUANTIZE_CONFIG_FILE,
    QWEIGHT,
    QZEROS,
    SCALES,
    V1_ZERO_OFFSET,
    WEIGHT,
    CheckpointFormat,
)
from bitsmith.formats.gptq.dynamic import default_scheme, dynamic_config
from bitsmith.formats.gptq.packing import pack_dim0, packed_rows
from bitsmith.formats.grid_checks import check_source_weight, unquantized_config
from bitsmith.formats.packed_checkpoint import write_json, write_packed_weights
from bitsmith.formats.safetensors_io import TensorInfo, check_dense, scan_checkpoint
from bitsmith.quantized import Quantized, QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, GPTQOptions, QuantScheme

DEFAULT_QUANTIZER = f"bitsmith:{bitsmith.__version__}"


def parse_checkpoint_format(value: str) -> CheckpointFormat:
    """`CheckpointFormat` from its string, `ConfigError` listing the choices otherwise."""
    try:
        return CheckpointFormat(value)
    except ValueError:
        choices = ", ".join(f.value for f in CheckpointFormat)
        raise ConfigError(f"checkpoint_format must be one of {choices}, got {value!r}") from None


def quantization_config(
    scheme: QuantScheme,
    options: GPTQOptions,
    checkpoint_format: CheckpointFormat,
    *,
    lm_head: bool,
    quantizer: str,
    dynamic: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The `quantization_config` block (§1.7), written to config.json and quantize_config.json;
    `dynamic` (per-module overrides, see `bitsmith.formats.gptq.dynamic`) only when there are any."""
    return {
        **({"dynamic": dict(dynamic)} if dynamic else {}),
        "quant_method": QUANT_METHOD,
        "method": QUANT_METHOD,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        # desc_act tells loaders to follow g_idx; static groups keep the groups contiguous, so they need not.
        "desc_act": options.act_order and not options.static_groups,
        "sym": scheme.sym,
        "lm_head": lm_head,
        "format": checkpoint_format.value,
        "checkpoint_format": checkpoint_format.value,
        "pack_dtype": PACK_DTYPE,
        "true_sequential": options.true_sequential,
        "static_groups": options.static_groups,
        "damp_percent": options.damp_percent,
        "meta": {"quantizer": [quantizer]},
    }


def pack_layer(qw: QuantizedWeight, checkpoint_format: CheckpointFormat) -> dict[str, torch.Tensor]:
    """qweight / qzeros / scales / g_idx of one (already validated) quantized linear."""
    bits = qw.scheme.bits
    stored_zeros = qw.zeros.to(torch.int64)
    if checkpoint_format is CheckpointFormat.V1:
        stored_zeros = stored_zeros - V1_ZERO_OFFSET
    return {
        QWEIGHT: pack_dim0(qw.codes.t(), bits),
        QZEROS: pack_dim0(stored_zeros, bits).t().contiguous(),
        SCALES: qw.scales.t().to(torch.float16).contiguous(),
        G_IDX: qw.g_idx.to(torch.int32, copy=True).contiguous(),  # linears solved together share g_idx
    }


def packed_nbytes(qw: QuantizedWeight) -> int:
    """Bytes of a layer's packed tensors (for sharding before anything is packed)."""
    n, k = qw.shape
    groups = qw.scales.shape[1]
    bits = qw.scheme.bits
    return 4 * (k * bits // 32 * n) + 4 * (groups * n * bits // 32) + 2 * groups * n + 4 * k


_MODEL_BUILD = threading.Lock()


def linear_names(source_model_dir: Path) -> frozenset[str]:
    """Names of every `nn.Linear` of the source causal LM, from its config on the meta device.

    Why not trust the tensor list: a 2-D `.weight` may be an embedding, which GPTQ consumers never
    replace by a quantized linear. Building the model on `meta` allocates nothing.

    Why the explicit dtype and the lock: `from_config` switches torch's process-wide default dtype
    to the config's (bfloat16 for most checkpoints) while it builds, and back afterwards. Packers
    of concurrent jobs run in threads of one process, so two overlapping builds could restore each
    other's bfloat16 for good, and any tensor another thread made meanwhile would be bfloat16. The
    dtype only decides meta tensors' dtype here, so building in the default leaves it untouched.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source_model_dir, local_files_only=True)
        with _MODEL_BUILD, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.get_default_dtype())
    except (ValueError, KeyError, OSError) as e:
        raise UnsupportedError(
            f"cannot build the model of {source_model_dir} to list its linears: {e}"
        ) from e
    return frozenset(name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear))


def validate_layer(
    name: str,
    qw: QuantizedWeight,
    source: Mapping[str, TensorInfo],
    linears: frozenset[str],
    options: GPTQOptions,
    checkpoint_format: CheckpointFormat,
) -> None:
    """Refuse a layer that would produce a wrong or unloadable checkpoint (see the module docstring)."""
    where = f"quantized layer {name!r}"
    if name not in linears:
        raise ConfigError(f"{where} is not an nn.Linear of the source model")
    weight = source.get(f"{name}.{WEIGHT}")
    check_source_weight(where, name, qw, weight.shape if weight is not None else None)
    scheme, (n, k) = qw.scheme, qw.shape
    packed_rows(k, scheme.bits, what=f"{where} in_features")
    packed_rows(n, scheme.bits, what=f"{where} out_features")
    if scheme.group_size != PER_CHANNEL and k % scheme.group_size:
        raise FormatError(f"{where}: group_size {scheme.group_size} does not divide in_features {k}")
    groups = scheme.groups(k)
    if qw.scales.shape[1] != groups:
        raise FormatError(f"{where}: {qw.scales.shape[1]} groups, expected {groups} for K={k}")
    _check_range(where, "codes", qw.codes, 0, scheme.maxq)
    if scheme.sym:
        mid = 1 << (scheme.bits - 1)
        _check_range(where, "symmetric zeros", qw.zeros, mid, mid)
    else:
        low = V1_ZERO_OFFSET if checkpoint_format is CheckpointFormat.V1 else 0
        hint = " (v1 stores zero-1; quantize with min_zero=1 or write gptq_v2)" if low else ""
        _check_range(where, f"zeros{hint}", qw.zeros, low, scheme.maxq)
    if not torch.isfinite(qw.scales.to(torch.float16)).all():
        raise FormatError(f"{where}: scales are not finite in float16")
    _check_g_idx(where, qw.g_idx, k, scheme.effective_group_size(k), groups, options)


def _check_range(where: str, what: str, values: torch.Tensor, low: int, high: int) -> None:
    if values.is_floating_point():
        raise FormatError(f"{where}: {what} must be integers, got {values.dtype}")
    if values.numel() and (int(values.min()) < low or int(values.max()) > high):
        raise FormatError(
            f"{where}: {what} span [{int(values.min())}, {int(values.max())}], allowed [{low}, {high}]"
        )


def _check_g_idx(
    where: str, g_idx: torch.Tensor, k: int, group_size: int, groups: int, options: GPTQOptions
) -> None:
    trivial = torch.arange(k, dtype=torch.int64) // group_size
    g = g_idx.to(torch.int64)
    if not options.act_order or options.static_groups:
        if not torch.equal(g, trivial):
            raise FormatError(f"{where}: g_idx must be arange(K)//group_size without act-order")
        return
    _check_range(where, "g_idx", g_idx, 0, groups - 1)
    if not torch.equal(torch.bincount(g, minlength=groups), torch.bincount(trivial, minlength=groups)):
        raise FormatError(f"{where}: act-order g_idx must put exactly group_size columns in every group")


def write_gptq(
    out_dir: Path,
    *,
    source_model_dir: Path,
    quantized: Mapping[str, Quantized],
    options: GPTQOptions,
    variant: str | None = None,
    dense: Mapping[str, torch.Tensor] | None = None,
    quantizer: str = DEFAULT_QUANTIZER,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a GPTQ checkpoint into the existing empty directory `out_dir` and return it.

    `quantized` maps module names (``model.layers.0.self_attn.q_proj``, no ``.weight``) to their
    solved weights; the most common scheme is the global one, the others and the linears left out
    (kept in float) go to `dynamic`; `dense` replaces source tensors (see
    `bitsmith.formats.base.Writer`). Weights larger than `max_shard_bytes` are split into
    ``model-0000i-of-0000n.safetensors`` shards with an index. `variant` is the checkpoint format,
    "gptq" (v1, the default) or "gptq_v2".
    """
    quantized = integer_weights(quantized, "GPTQ")
    out_dir, source_model_dir = Path(out_dir), Path(source_model_dir)
    fmt = parse_checkpoint_format(variant or CheckpointFormat.V1)
    check_writer_inputs(out_dir, max_shard_bytes=max_shard_bytes)
    config = unquantized_config(source_model_dir, markers=(QUANTIZATION_CONFIG_KEY,))
    source = scan_checkpoint(source_model_dir)
    if not quantized:
        raise ConfigError("write_gptq got no quantized layers")
    scheme = default_scheme(quantized)
    linears = linear_names(source_model_dir)
    for name, qw in sorted(quantized.items()):
        validate_layer(name, qw, source, linears, options, fmt)
    check_dense(source, dense or {}, quantized=quantized)

    write_packed_weights(
        out_dir,
        source=source,
        quantized=quantized,
        pack=lambda qw: pack_layer(qw, fmt),
        packed_nbytes=packed_nbytes,
        dense=dense,
        max_shard_bytes=max_shard_bytes,
    )

    skipped = sorted(linears - set(quantized) - {LM_HEAD})
    qcfg = quantization_config(scheme, options, fmt, lm_head=LM_HEAD in quantized, quantizer=quantizer,
                               dynamic=dynamic_config(quantized, skipped, scheme))
    write_json(out_dir / CONFIG_FILE, {**config, QUANTIZATION_CONFIG_KEY: qcfg})
    write_json(out_dir / QUANTIZE_CONFIG_FILE, qcfg)
    copy_present_files(source_model_dir, out_dir, COPIED_FILES)
    return out_dir

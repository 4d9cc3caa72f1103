"""Read and validate a GPTQ safetensors checkpoint (FORMATS.md §1, checklist §8).

Why a reader at all: the evaluator scores what consumers will load, so it must rebuild the float model
from the artifact's bytes rather than from the solver's in-memory results; and artifacts from the
store or the wire are untrusted. Everything is checked before it is used: the config (present in
config.json and/or quantize_config.json, equal where both exist, known values), every safetensors
header (bounds, sizes, overlaps — see `safetensors_io`), every quantized tensor's dtype and shape
against the config, g_idx ranges and group sizes, and symmetric zeros. Anything off is a
`FormatError` that names the file or layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import FormatError
from bitsmith.formats.base import dense_state, read_json_object
from bitsmith.formats.gptq.constants import (
    BIAS,
    BITS,
    CONFIG_FILE,
    G_IDX,
    PACK_DTYPE,
    QUANT_METHOD,
    QUANTIZATION_CONFIG_KEY,
    QUANTIZE_CONFIG_FILE,
    QUANTIZED_SUFFIXES,
    QWEIGHT,
    QZEROS,
    SCALES,
    ST_FLOAT16,
    ST_INT32,
    V1_ZERO_OFFSET,
    WEIGHT,
    CheckpointFormat,
)
from bitsmith.formats.gptq.dynamic import resolve
from bitsmith.formats.gptq.packing import packed_rows, unpack_dim0
from bitsmith.formats.safetensors_io import TensorInfo, expect_tensor, load_tensors, scan_checkpoint
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import PER_CHANNEL, QuantScheme

REQUIRED_KEYS = ("quant_method", "bits", "group_size", "desc_act", "sym")


@dataclass(frozen=True, slots=True, kw_only=True)
class GPTQCheckpoint:
    """A validated GPTQ checkpoint: its configs, unpacked quantized linears and float tensors.

    `quantized` holds true zeros whatever the checkpoint format. For v1 asymmetric files the scheme
    says `min_zero=1`: that is all a v1 file can represent.
    """

    path: Path
    config: Mapping[str, Any]
    quantization_config: Mapping[str, Any]
    checkpoint_format: CheckpointFormat
    desc_act: bool
    scheme: QuantScheme
    quantized: Mapping[str, QuantizedWeight]
    tensors: Mapping[str, torch.Tensor]

    def dense_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float state dict: each quantized linear's `.weight` is its dequantized weight."""
        return dense_state(self.tensors, self.quantized, dtype)


def read_configs(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, quantization config); the latter from config.json and/or quantize_config.json."""
    config_path, quant_path = path / CONFIG_FILE, path / QUANTIZE_CONFIG_FILE
    if not config_path.is_file():
        raise FormatError(f"GPTQ checkpoint {path} has no {CONFIG_FILE}")
    config = read_json_object(config_path)
    embedded = config.get(QUANTIZATION_CONFIG_KEY)
    standalone = read_json_object(quant_path) if quant_path.is_file() else None
    if embedded is not None and not isinstance(embedded, dict):
        raise FormatError(f"{config_path}: {QUANTIZATION_CONFIG_KEY} must be an object")
    qcfg = embedded if embedded is not None else standalone
    if qcfg is None:
        raise FormatError(
            f"GPTQ checkpoint {path} has no quantization config ({CONFIG_FILE}:{QUANTIZATION_CONFIG_KEY} "
            f"or {QUANTIZE_CONFIG_FILE})"
        )
    if embedded is not None and standalone is not None and embedded != standalone:
        differing = sorted(k for k in set(embedded) | set(standalone) if embedded.get(k) != standalone.get(k))
        raise FormatError(f"{path}: {CONFIG_FILE} and {QUANTIZE_CONFIG_FILE} disagree on {differing}")
    return config, qcfg


def parse_quantization_config(
    qcfg: Mapping[str, Any], where: str
) -> tuple[QuantScheme, CheckpointFormat, bool]:
    """(scheme, checkpoint format, desc_act) from a quantization config, every field type-checked."""
    if missing := [k for k in REQUIRED_KEYS if k not in qcfg]:
        raise FormatError(f"{where}: quantization config lacks {missing}")
    if qcfg["quant_method"] != QUANT_METHOD:
        raise FormatError(f"{where}: quant_method is {qcfg['quant_method']!r}, not {QUANT_METHOD!r}")
    bits, group_size = qcfg["bits"], qcfg["group_size"]
    if type(bits) is not int or bits not in BITS:
        raise FormatError(f"{where}: bits must be one of {BITS}, got {bits!r}")
    if type(group_size) is not int or (group_size != PER_CHANNEL and group_size <= 0):
        raise FormatError(f"{where}: group_size must be -1 or positive, got {group_size!r}")
    for key in ("desc_act", "sym", "lm_head"):
        if key in qcfg and type(qcfg[key]) is not bool:
            raise FormatError(f"{where}: {key} must be true/false, got {qcfg[key]!r}")
    if qcfg.get("pack_dtype", PACK_DTYPE) != PACK_DTYPE:
        raise FormatError(f"{where}: pack_dtype {qcfg['pack_dtype']!r} is not {PACK_DTYPE!r}")
    fmt_values = {qcfg[k] for k in ("format", "checkpoint_format") if k in qcfg}
    if len(fmt_values) > 1:
        raise FormatError(f"{where}: format and checkpoint_format disagree: {sorted(map(str, fmt_values))}")
    raw_fmt = fmt_values.pop() if fmt_values else CheckpointFormat.V1.value
    try:
        fmt = CheckpointFormat(raw_fmt)
    except ValueError:
        raise FormatError(f"{where}: unsupported checkpoint format {raw_fmt!r}") from None
    sym = qcfg["sym"]
    min_zero = V1_ZERO_OFFSET if fmt is CheckpointFormat.V1 and not sym else 0
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym, min_zero=min_zero)
    return scheme, fmt, qcfg["desc_act"]


def _layer_infos(prefix: str, infos: Mapping[str, TensorInfo], scheme: QuantScheme) -> dict[str, TensorInfo]:
    """Shape/dtype checks of one layer's tensors from the headers alone (nothing loaded yet)."""
    where = f"layer {prefix!r}"
    g_idx, scales = infos.get(f"{prefix}.{G_IDX}"), infos.get(f"{prefix}.{SCALES}")
    if g_idx is None or len(g_idx.shape) != 1:
        raise FormatError(f"{where}: {G_IDX} missing or not 1-D")
    if scales is None or len(scales.shape) != 2:
        raise FormatError(f"{where}: {SCALES} missing or not 2-D")
    (k,), (groups, n) = g_idx.shape, scales.shape
    expected_groups = 1 if scheme.group_size == PER_CHANNEL else -(-k // scheme.group_size)
    if groups != expected_groups:
        raise FormatError(f"{where}: {groups} groups, expected {expected_groups} for K={k}")
    bits = scheme.bits
    rows_k = packed_rows(k, bits, what=f"{where} in_features")
    words_n = packed_rows(n, bits, what=f"{where} out_features")
    checked = {
        QWEIGHT: expect_tensor(infos.get(f"{prefix}.{QWEIGHT}"), f"{where}.{QWEIGHT}", (ST_INT32,), [(rows_k, n)]),
        QZEROS: expect_tensor(infos.get(f"{prefix}.{QZEROS}"), f"{where}.{QZEROS}", (ST_INT32,), [(groups, words_n)]),
        SCALES: expect_tensor(scales, f"{where}.{SCALES}", (ST_FLOAT16,), [(groups, n)]),
        G_IDX: expect_tensor(g_idx, f"{where}.{G_IDX}", (ST_INT32,), [(k,)]),
    }
    if f"{prefix}.{BIAS}" in infos:
        expect_tensor(infos[f"{prefix}.{BIAS}"], f"{where}.{BIAS}", (ST_FLOAT16,), [(n,)])
    if f"{prefix}.{WEIGHT}" in infos:
        raise FormatError(f"{where}: a float {WEIGHT} remains beside {QWEIGHT}")
    return checked


def unpack_layer(
    prefix: str,
    tensors: Mapping[str, torch.Tensor],
    scheme: QuantScheme,
    fmt: CheckpointFormat,
    desc_act: bool,
) -> QuantizedWeight:
    """QuantizedWeight (true zeros, original column order) from one layer's packed tensors."""
    where = f"layer {prefix!r}"
    bits = scheme.bits
    codes = unpack_dim0(tensors[QWEIGHT], bits).t().to(torch.uint8).contiguous()
    zeros = unpack_dim0(tensors[QZEROS].t(), bits)
    if fmt is CheckpointFormat.V1:
        zeros = zeros + V1_ZERO_OFFSET  # like every consumer: no masking, an underflowed field reads 2^b
    scales = tensors[SCALES].t().float().contiguous()
    g_idx = tensors[G_IDX].contiguous()
    k = codes.shape[1]
    groups = scales.shape[1]
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise FormatError(f"{where}: g_idx values outside [0, {groups})")
    group_size = scheme.effective_group_size(k)
    trivial = torch.arange(k, dtype=torch.int64) // group_size
    if not desc_act and not torch.equal(g_idx.long(), trivial):
        raise FormatError(f"{where}: desc_act is false but g_idx is not arange(K)//group_size")
    if k % group_size == 0 and not torch.equal(
        torch.bincount(g_idx.long(), minlength=groups), torch.bincount(trivial, minlength=groups)
    ):
        raise FormatError(f"{where}: g_idx does not put group_size={group_size} columns in every group")
    if scheme.sym and not bool((zeros == 1 << (bits - 1)).all()):
        raise FormatError(f"{where}: sym is true but zeros are not all {1 << (bits - 1)}")
    return QuantizedWeight(
        codes=codes, scales=scales, zeros=zeros.to(torch.int32), g_idx=g_idx, scheme=scheme
    )


def read_gptq(path: Path) -> GPTQCheckpoint:
    """Validate and load the GPTQ checkpoint directory `path` (one file or shards + index)."""
    path = Path(path)
    config, qcfg = read_configs(path)
    scheme, fmt, desc_act = parse_quantization_config(qcfg, str(path))
    dynamic = qcfg.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise FormatError(f"{path}: dynamic must be an object, got {dynamic!r}")
    infos = scan_checkpoint(path)
    prefixes = sorted(name.removesuffix(f".{QWEIGHT}") for name in infos if name.endswith(f".{QWEIGHT}"))
    if not prefixes:
        raise FormatError(f"GPTQ checkpoint {path} has no {QWEIGHT} tensors")
    owned: set[str] = set()
    layer_infos: dict[str, dict[str, TensorInfo]] = {}
    schemes: dict[str, QuantScheme] = {}
    for prefix in prefixes:
        layer_scheme = resolve(dynamic, prefix, scheme, where=f"{path}: dynamic")
        if layer_scheme is None:
            raise FormatError(f"{path}: {prefix} is packed but dynamic says it is not quantized")
        schemes[prefix] = layer_scheme
        layer_infos[prefix] = _layer_infos(prefix, infos, layer_scheme)
        owned.update(f"{prefix}.{suffix}" for suffix in QUANTIZED_SUFFIXES)
    stray = sorted(name for name in set(infos) - owned if name.rpartition(".")[2] in QUANTIZED_SUFFIXES)
    if stray:
        raise FormatError(f"GPTQ checkpoint {path}: {stray[0]} has no matching {QWEIGHT}")
    loaded = load_tensors(info for parts in layer_infos.values() for info in parts.values())
    quantized = {
        prefix: unpack_layer(
            prefix, {suffix: loaded[info.name] for suffix, info in parts.items()}, schemes[prefix], fmt, desc_act
        )
        for prefix, parts in layer_infos.items()
    }
    tensors = load_tensors(infos[name] for name in sorted(set(infos) - owned))
    return GPTQCheckpoint(
        path=path,
        config=config,
        quantization_config=qcfg,
        checkpoint_format=fmt,
        desc_act=desc_act,
        scheme=scheme,
        quantized=quantized,
        tensors=tensors,
    )

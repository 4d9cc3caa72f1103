"""AWQ GEMM format: exact write→read round trips of RTN codes on the demo model, an independent unpacker
written from FORMATS.md §2.2, skipped linears and float replacements, every refusal of the writer, hostile
files for the reader, and mlx-lm's AWQ importer as a real consumer of the files."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.awq import read_awq, write_awq
from bitsmith.formats.awq.packing import pack_layer, pack_output_dim, unpack_output_dim
from bitsmith.formats.awq.writer import not_convert_entries
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.quantized import QuantizedWeight
from bitsmith.runtimes import artifact_format, load_reference
from bitsmith.schemes import Format, GPTQOptions, QuantScheme
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.unit.format_cases import assert_writer_refuses

SOURCE = load_file(DEMO_MODEL / "model.safetensors")
LINEARS = sorted(name.removesuffix(".weight") for name in SOURCE if ".layers." in name and name.endswith("proj.weight"))
Q = "model.layers.0.self_attn.q_proj"
SKIPPED = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
           "model.layers.2.mlp.down_proj"]

ASYM = QuantScheme(bits=4, group_size=128)
SYM = QuantScheme(bits=4, group_size=128, sym=True)


@cache
def _rtn(scheme: QuantScheme, name: str) -> QuantizedWeight:
    return quantize_rtn(SOURCE[f"{name}.weight"].float(), scheme, name=name)


def rtn(scheme: QuantScheme, names: list[str] | None = None) -> dict[str, QuantizedWeight]:
    """RTN codes of the demo's block linears (fresh tensors, so a test may damage them)."""
    solved = {name: _rtn(scheme, name) for name in (names if names is not None else LINEARS)}
    return {name: replace(qw, codes=qw.codes.clone(), scales=qw.scales.clone(), zeros=qw.zeros.clone(),
                          g_idx=qw.g_idx.clone()) for name, qw in solved.items()}


def write(out: Path, quantized: dict[str, QuantizedWeight], source: Path = DEMO_MODEL, **kwargs) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return write_awq(out, source_model_dir=source, quantized=quantized, options=GPTQOptions(), **kwargs)


# --- an independent unpacker, written from FORMATS.md §2.2 with plain integers --------------------------

SPEC_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # restated from the spec on purpose: not imported from the packer


def spec_unpack(words: torch.Tensor) -> np.ndarray:
    """[R, W] int32 → [8W, R]: field i (bits 4i..4i+3) of word [r, c] is output channel 8c + ORDER[i]."""
    u = words.numpy().astype(np.int64) & 0xFFFFFFFF
    out = np.full((8 * u.shape[1], u.shape[0]), -1, dtype=np.int64)
    for c in range(u.shape[1]):
        for i, channel in enumerate(SPEC_ORDER):
            out[8 * c + channel] = (u[:, c] >> (4 * i)) & 0xF
    return out


def test_a_hand_packed_word() -> None:
    """Channels 0..7 holding their own index: fields 0..7 hold 0,2,4,6,1,3,5,7, i.e. 0x75316420."""
    word = pack_output_dim(torch.arange(8).reshape(8, 1))
    assert word.shape == (1, 1) and word.item() & 0xFFFFFFFF == 0x75316420
    assert spec_unpack(word).flatten().tolist() == list(range(8))
    values = torch.randint(0, 16, (64, 5), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(spec_unpack(pack_output_dim(values)), values.numpy())
    assert torch.equal(unpack_output_dim(pack_output_dim(values)), values)


# --- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [ASYM, QuantScheme(bits=4, group_size=64, sym=True),
                                    QuantScheme(bits=4, group_size=32)], ids=str)
def test_round_trip_is_exact(tmp_path: Path, scheme: QuantScheme) -> None:
    quantized = rtn(scheme)
    out = write(tmp_path / "art", quantized)
    ckpt = read_awq(out)
    assert ckpt.scheme == QuantScheme(bits=4, group_size=scheme.group_size, sym=scheme.sym)
    assert ckpt.modules_to_not_convert == () and set(ckpt.quantized) == set(quantized)
    raw = load_file(out / "model.safetensors")
    dense = ckpt.dense_state_dict()
    for name, qw in quantized.items():
        got = ckpt.quantized[name]
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.zeros, qw.zeros), name
        assert torch.equal(got.g_idx, qw.g_idx) and torch.equal(got.scales, qw.scales.half().float()), name
        # the independent unpacker reads back exactly the codes and true zeros we meant to write
        assert np.array_equal(spec_unpack(raw[f"{name}.qweight"]), qw.codes.numpy()), name
        assert np.array_equal(spec_unpack(raw[f"{name}.qzeros"]), qw.zeros.numpy()), name
        # §8: dequant from the file is the fake-quantized weight, up to fp16 rounding of the scales
        idx = qw.g_idx.long()
        steps = qw.codes.float() - qw.zeros.float()[:, idx]
        assert torch.equal(dense[f"{name}.weight"], steps * qw.scales.half().float()[:, idx]), name
        bound = steps.abs() * (qw.scales - qw.scales.half().float()).abs()[:, idx]
        exact = qw.dequantize()
        assert ((dense[f"{name}.weight"] - exact).abs() <= bound + 1e-6 * exact.abs()).all(), name
    if scheme.sym:
        for name in quantized:
            assert (raw[f"{name}.qzeros"].numpy().view(np.uint32) == 0x88888888).all(), name


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published asymmetric artifact with a manifest, shared by read-only tests."""
    out = tmp_path_factory.mktemp("awq") / "art"
    quantized = rtn(ASYM)
    handler = get_format(Format.AWQ)
    build_artifact(out, lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                                options=GPTQOptions()), format=Format.AWQ, recipe={})
    return out


@pytest.fixture(scope="module")
def skipping_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layer 1's q/k/v and layer 2's down_proj left in float."""
    quantized = rtn(SYM, [name for name in LINEARS if name not in SKIPPED])
    return write(tmp_path_factory.mktemp("awq") / "skip", quantized)


def test_artifact_files_config_and_tensors(artifact: Path) -> None:
    assert sorted(p.name for p in artifact.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]
    assert verify_manifest(artifact).format is Format.AWQ and artifact_format(artifact) is Format.AWQ
    assert get_format(Format.AWQ).read is read_awq
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (artifact / name).read_bytes() == (DEMO_MODEL / name).read_bytes()
    config = json.loads((artifact / "config.json").read_text())
    assert config.pop("quantization_config") == {"quant_method": "awq", "zero_point": True, "group_size": 128,
                                                 "bits": 4, "version": "gemm", "modules_to_not_convert": None}
    assert config == json.loads((DEMO_MODEL / "config.json").read_text())
    with safe_open(str(artifact / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        out = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    untouched = set(SOURCE) - {f"{name}.weight" for name in LINEARS}
    assert set(out) == untouched | {f"{n}.{s}" for n in LINEARS for s in ("qweight", "qzeros", "scales")}
    for name in untouched:
        assert out[name].dtype == SOURCE[name].dtype, name
        assert torch.equal(out[name].view(torch.uint8), SOURCE[name].view(torch.uint8)), name
    for name in LINEARS:
        n, k = SOURCE[f"{name}.weight"].shape
        assert (out[f"{name}.qweight"].dtype, tuple(out[f"{name}.qweight"].shape)) == (torch.int32, (k, n // 8))
        assert (out[f"{name}.qzeros"].dtype, tuple(out[f"{name}.qzeros"].shape)) == (torch.int32, (k // 128, n // 8))
        assert (out[f"{name}.scales"].dtype, tuple(out[f"{name}.scales"].shape)) == (torch.float16, (k // 128, n))


def test_transformers_awq_config_accepts_the_block(artifact: Path) -> None:
    from transformers import AwqConfig

    block = json.loads((artifact / "config.json").read_text())["quantization_config"]
    parsed = AwqConfig.from_dict(block)
    assert (parsed.bits, parsed.group_size, parsed.zero_point, parsed.format) == (4, 128, True, "gemm")
    assert parsed.to_dict()["version"] == "gemm"


def test_dense_state_dict_rebuilds_the_demo_model(artifact: Path) -> None:
    state = read_awq(artifact).dense_state_dict(torch.float32)
    assert set(state) == set(SOURCE) and all(t.dtype == torch.float32 for t in state.values())
    model = load_reference(artifact)
    ids = torch.randint(0, 4096, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# --- skipped linears and float replacements -----------------------------------------------------------------


def test_skipped_linears_stay_float_and_are_named(skipping_artifact: Path) -> None:
    qcfg = json.loads((skipping_artifact / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_to_not_convert"] == SKIPPED
    ckpt = read_awq(skipping_artifact)
    assert ckpt.modules_to_not_convert == tuple(SKIPPED) and ckpt.scheme.sym
    assert set(ckpt.quantized) == set(LINEARS) - set(SKIPPED)
    raw = load_file(skipping_artifact / "model.safetensors")
    for name in SKIPPED:
        assert not {f"{name}.qweight", f"{name}.scales"} & set(raw), name
        assert torch.equal(raw[f"{name}.weight"].view(torch.uint8), SOURCE[f"{name}.weight"].view(torch.uint8))
        assert torch.equal(ckpt.dense_state_dict()[f"{name}.weight"], SOURCE[f"{name}.weight"].float())
    # transformers skips a module whose name contains an entry: exactly the skipped ones match
    entries = qcfg["modules_to_not_convert"]
    assert {name for name in [*LINEARS, "lm_head"] if any(e in name for e in entries)} == set(SKIPPED)
    # vLLM checks its fused layers shard by shard, and all shards must agree
    for fused, skipped_blocks in (("self_attn.qkv_proj", [1]), ("mlp.gate_up_proj", []), ("mlp.down_proj", [2])):
        got = [b for b in range(4) if vllm_skips(f"model.layers.{b}.{fused}", entries)]
        assert got == skipped_blocks, fused


VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def vllm_skips(prefix: str, entries: list[str]) -> bool:
    """vLLM's `is_layer_skipped(..., skip_with_substr=True)` as awq_marlin uses it (FORMATS.md §2.4)."""
    head, _, proj = prefix.rpartition(".")
    shards = [f"{head}.{shard}" for shard in VLLM_FUSED.get(proj, [proj])]
    skipped = {any(e in shard for e in entries) for shard in shards}
    assert len(skipped) == 1, f"vLLM refuses {prefix}: some but not all shards are quantized"
    return skipped.pop()


def test_entries_cannot_match_other_modules() -> None:
    names = [f"model.layers.{b}.{local}" for b in range(12) for local in ("self_attn.o_proj", "mlp.down_proj")]
    entries = not_convert_entries(["model.layers.1.mlp.down_proj"], names)
    assert [name for name in names if any(e in name for e in entries)] == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(UnsupportedError, match=r"would also skip \['blocks.0.proj_out'\]"):
        not_convert_entries(["blocks.0.proj"], ["blocks.0.proj", "blocks.0.proj_out"])


def test_partly_quantized_fused_group_is_refused(tmp_path: Path) -> None:
    quantized = rtn(SYM, [name for name in LINEARS if name != "model.layers.3.mlp.up_proj"])
    with pytest.raises(UnsupportedError, match=r"gate_proj'\] are quantized but \['model.layers.3.mlp.up_proj"):
        write(tmp_path / "art", quantized)
    assert not any((tmp_path / "art").iterdir())


def test_dense_replacements_are_written(tmp_path: Path) -> None:
    quantized = rtn(ASYM, [name for name in LINEARS if name not in SKIPPED])
    norm, linear = "model.layers.0.input_layernorm.weight", "model.layers.2.mlp.down_proj.weight"
    dense = {norm: SOURCE[norm].float() * 1.5, linear: SOURCE[linear].float() / 3}
    out = write(tmp_path / "art", quantized, dense=dense)
    raw = load_file(out / "model.safetensors")
    for name, value in dense.items():
        assert raw[name].dtype == SOURCE[name].dtype and torch.equal(raw[name], value.to(SOURCE[name].dtype)), name
    assert torch.equal(raw["model.norm.weight"], SOURCE["model.norm.weight"])
    for bad, match in (({f"{Q}.weight": SOURCE[f"{Q}.weight"]}, "belongs to a quantized linear"),
                       ({"model.layers.0.nope": torch.zeros(2)}, "not in the source"),
                       ({norm: torch.full_like(SOURCE[norm].float(), float("nan"))}, "NaN")):
        with pytest.raises(ConfigError, match=match):
            write(tmp_path / "bad", quantized, dense=bad)
        assert not any((tmp_path / "bad").iterdir())


def test_sharded_output_reads_back(tmp_path: Path) -> None:
    quantized = rtn(ASYM)
    out = write(tmp_path / "art", quantized, max_shard_bytes=2**21)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    ckpt = read_awq(out)
    assert all(torch.equal(ckpt.quantized[n].codes, qw.codes) for n, qw in quantized.items())


# --- writer refusals: each names the problem and leaves the directory empty -----------------------------------


def _shuffle_g_idx(q: dict[str, QuantizedWeight]) -> None:
    q[Q] = replace(q[Q], g_idx=q[Q].g_idx[torch.randperm(256, generator=torch.Generator().manual_seed(0))])


def _move(q: dict[str, QuantizedWeight], old: str, new: str) -> None:
    q[new] = q.pop(old)


def _apply(
    q: dict[str, QuantizedWeight], change: Callable[[dict[str, QuantizedWeight]], object]
) -> dict[str, QuantizedWeight]:
    change(q)
    return q


REFUSALS: dict[str, tuple[Callable[[], dict[str, QuantizedWeight]], type[Exception], str]] = {
    "8-bit": (lambda: rtn(QuantScheme(bits=8, group_size=128)), UnsupportedError,
              r"4-bit codes only, not 8-bit: layer 'model.layers.0.mlp.down_proj' \(\+27 more\)"),
    "2-bit": (lambda: rtn(QuantScheme(bits=2, group_size=64, sym=True), [Q]), UnsupportedError, "not 2-bit"),
    "per-channel": (lambda: rtn(QuantScheme(bits=4, group_size=-1), [Q]), UnsupportedError, "per-channel"),
    "group 256": (lambda: rtn(QuantScheme(bits=4, group_size=256), [Q]), UnsupportedError,
                  r"group_size 256 is not one.*: layer 'model.layers.0.self_attn.q_proj'$"),
    "mixed group sizes": (lambda: {**rtn(ASYM), Q: rtn(QuantScheme(bits=4, group_size=64), [Q])[Q]},
                          UnsupportedError, "holds one scheme, but the layers use 2"),
    "mixed sym": (lambda: {**rtn(ASYM), Q: rtn(SYM, [Q])[Q]}, UnsupportedError, "holds one scheme"),
    "act-order": (lambda: _apply(rtn(ASYM), _shuffle_g_idx), UnsupportedError, r"q_proj'.*act-order"),
    "lm_head": (lambda: {**rtn(ASYM), "lm_head": rtn(ASYM, [Q])[Q]}, UnsupportedError, "outside the decoder blocks"),
    "embedding": (lambda: _apply(rtn(ASYM), lambda q: _move(q, Q, "model.embed_tokens")), ConfigError,
                  "'model.embed_tokens' is not an nn.Linear"),
    "no such layer": (lambda: _apply(rtn(ASYM), lambda q: _move(q, Q, "model.layers.9.self_attn.q_proj")),
                      ConfigError, "not an nn.Linear"),
    "wrong shape": (lambda: {**rtn(ASYM), "model.layers.0.self_attn.k_proj": rtn(ASYM, [Q])[Q]}, ConfigError,
                    r"k_proj'.*source weight is \[128, 256\]"),
    "code 16": (lambda: _apply(rtn(ASYM), lambda q: q[Q].codes.__setitem__((0, 0), 16)), FormatError,
                r"q_proj'.*codes span \[0, 16\]"),
    "zero 16": (lambda: _apply(rtn(ASYM), lambda q: q[Q].zeros.__setitem__((0, 0), 16)), FormatError, "zeros span"),
    "sym zero 7": (lambda: _apply(rtn(SYM), lambda q: q[Q].zeros.__setitem__((0, 0), 7)), FormatError,
                   "symmetric zeros"),
    "scale overflows fp16": (lambda: _apply(rtn(ASYM), lambda q: q[Q].scales.__setitem__((0, 0), 1e6)),
                             FormatError, "not finite in float16"),
    "nothing quantized": (lambda: {}, ConfigError, "no quantized layers"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_writer_refuses_before_writing(tmp_path: Path, case: str) -> None:
    make, error, match = REFUSALS[case]
    assert_writer_refuses(tmp_path / "art", lambda out: write(out, make()), error, match)


def test_writer_refuses_bad_directories_variants_and_quantized_sources(tmp_path: Path, artifact: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old").write_text("x")
    with pytest.raises(AlreadyExistsError):
        write(tmp_path / "full", rtn(ASYM))
    with pytest.raises(ConfigError, match="variant must be 'gemm'"):
        write(tmp_path / "gemv", rtn(ASYM), variant="gemv")
    with pytest.raises(UnsupportedError, match="already quantized"):
        write(tmp_path / "requant", rtn(ASYM), source=artifact)
    assert not any((tmp_path / "gemv").iterdir()) and not any((tmp_path / "requant").iterdir())


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-block random llama whose MLP has 100 channels (not a multiple of 8)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=100, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, num_hidden_layers=1, vocab_size=128, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("narrow")
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_out_features_not_a_multiple_of_8_are_refused(tmp_path: Path, narrow_model: Path) -> None:
    weights = load_file(narrow_model / "model.safetensors")
    names = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    quantized = {name: quantize_rtn(weights[f"{name}.weight"].float(), QuantScheme(bits=4, group_size=32))
                 for name in names}
    with pytest.raises(UnsupportedError, match=r"gate_proj'.*out_features 100 is not a multiple of 8"):
        write(tmp_path / "art", quantized, source=narrow_model)
    assert not any((tmp_path / "art").iterdir())


# --- the reader: AutoAWQ-style configs and hostile files -----------------------------------------------------


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], object]) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_qcfg(path: Path, drop: tuple[str, ...] = (), **fields: object) -> None:
    data = json.loads((path / "config.json").read_text())
    data["quantization_config"].update(fields)
    for key in drop:
        del data["quantization_config"][key]
    (path / "config.json").write_text(json.dumps(data))


def _header_only(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def _drop_qcfg(path: Path) -> None:
    data = json.loads((path / "config.json").read_text())
    del data["quantization_config"]
    (path / "config.json").write_text(json.dumps(data))


def _legacy(path: Path, **block: object) -> None:
    """Move the quantization config into AutoAWQ's old standalone quant_config.json."""
    _drop_qcfg(path)
    (path / "quant_config.json").write_text(json.dumps(block))


def _unquantize(tensors: dict[str, torch.Tensor]) -> None:
    """Put layer L back in float without naming it in modules_to_not_convert."""
    for suffix in ("qweight", "qzeros", "scales"):
        del tensors[f"{L}.{suffix}"]
    tensors[f"{L}.weight"] = SOURCE[f"{L}.weight"]


def test_reads_autoawq_synonyms_and_legacy_config_files(artifact: Path, tmp_path: Path) -> None:
    expected = read_awq(artifact)
    path = _copy(artifact, tmp_path)
    _edit_qcfg(path, drop=("bits", "group_size", "version"), w_bit=4, q_group_size=128, format="GEMM")
    assert read_awq(path).scheme == expected.scheme
    _legacy(path, zero_point=True, q_group_size=128, w_bit=4, version="GEMM")
    got = read_awq(path)
    assert got.scheme == expected.scheme and all(
        torch.equal(got.quantized[n].codes, qw.codes) for n, qw in expected.quantized.items())
    (path / "quant_config.json").write_text(json.dumps({"zero_point": True, "q_group_size": 64, "w_bit": 4}))
    config = json.loads((artifact / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="disagrees with"):
        read_awq(path)


def test_reads_per_channel_checkpoints(artifact: Path, tmp_path: Path) -> None:
    """AutoAWQ's WQLinear_GEMM takes group_size -1 (one group per row); the reader does too."""
    path = _copy(artifact, tmp_path)
    per_channel = rtn(QuantScheme(bits=4, group_size=-1))
    _rewrite_tensors(path, lambda t: t.update(
        {f"{name}.{suffix}": tensor for name, qw in per_channel.items() for suffix, tensor in pack_layer(qw).items()}))
    _edit_qcfg(path, group_size=-1)
    ckpt = read_awq(path)
    assert ckpt.scheme == QuantScheme(bits=4, group_size=-1)
    dense = ckpt.dense_state_dict()
    for name, qw in per_channel.items():
        assert torch.equal(ckpt.quantized[name].codes, qw.codes) and torch.equal(ckpt.quantized[name].zeros, qw.zeros)
        assert torch.equal(dense[f"{name}.weight"], replace(qw, scales=qw.scales.half().float()).dequantize()), name


L = "model.layers.1.self_attn.k_proj"
HOSTILE: dict[str, tuple[Callable[[Path], object], str]] = {
    "truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
                  "model.safetensors"),
    "huge header length": (lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}"),
                           "header claims"),
    "offsets past the end": (lambda p: (p / "model.safetensors").write_bytes(
        _header_only({"x": {"dtype": "U8", "shape": [1 << 20], "data_offsets": [0, 1 << 20]}}) + b"\0" * 16),
        "outside the 16-byte data section"),
    "no weights file": (lambda p: (p / "model.safetensors").unlink(), "has neither model.safetensors"),
    "qweight int64": (lambda p: _rewrite_tensors(p, lambda t: t.update({f"{L}.qweight": t[f"{L}.qweight"].long()})),
                      r"k_proj'.qweight \(model.safetensors\) is I64"),
    "qweight rows cut": (lambda p: _rewrite_tensors(p, lambda t: t.update({f"{L}.qweight": t[f"{L}.qweight"][:-8]})),
                         "group_size 128 does not divide in_features 248"),
    "qzeros wrong shape": (lambda p: _rewrite_tensors(
        p, lambda t: t.update({f"{L}.qzeros": t[f"{L}.qzeros"][:, :-1].contiguous()})),
        r"k_proj'.qzeros .* expected I32 \[2, 16\]"),
    "scales fp32": (lambda p: _rewrite_tensors(p, lambda t: t.update({f"{L}.scales": t[f"{L}.scales"].float()})),
                    r"expected F16\|BF16 \[2, 128\]"),
    "scales missing": (lambda p: _rewrite_tensors(p, lambda t: t.pop(f"{L}.scales")), "k_proj'.scales is missing"),
    "scales nan": (lambda p: _rewrite_tensors(p, lambda t: t[f"{L}.scales"].__setitem__((0, 0), float("nan"))),
                   "scales are not finite"),
    "g_idx present": (lambda p: _rewrite_tensors(
        p, lambda t: t.update({f"{L}.g_idx": torch.zeros(256, dtype=torch.int32)})), "AWQ has no g_idx"),
    "float weight left": (lambda p: _rewrite_tensors(p, lambda t: t.update({f"{L}.weight": torch.zeros(2)})),
                          "float weight remains"),
    "stray qzeros": (lambda p: _rewrite_tensors(p, lambda t: t.update({"model.x.qzeros": t[f"{L}.qzeros"].clone()})),
                     "model.x.qzeros belongs to no quantized linear"),
    "float linear not listed": (lambda p: _rewrite_tensors(p, _unquantize),
                                r"k_proj' is float but not in modules_to_not_convert"),
    "quantized but listed": (lambda p: _edit_qcfg(p, modules_to_not_convert=[L]), "is quantized but matches"),
    "skip list not a list": (lambda p: _edit_qcfg(p, modules_to_not_convert="lm_head"), "must be null or a list"),
    "no config.json": (lambda p: (p / "config.json").unlink(), "has no config.json"),
    "config not json": (lambda p: (p / "config.json").write_text("{"), "not valid JSON"),
    "no quantization config": (_drop_qcfg, "no quantization config"),
    "block not an object": (lambda p: (p / "config.json").write_text(json.dumps({"quantization_config": [1]})),
                            "must be an object"),
    "not awq": (lambda p: _edit_qcfg(p, quant_method="gptq"), "quant_method is 'gptq'"),
    "no quant_method": (lambda p: _edit_qcfg(p, drop=("quant_method",)), "lacks 'quant_method'"),
    "bits 8": (lambda p: _edit_qcfg(p, bits=8), "bits must be 4"),
    "bits as string": (lambda p: _edit_qcfg(p, bits="4"), "bits must be 4"),
    "bits and w_bit disagree": (lambda p: _edit_qcfg(p, w_bit=8), "disagree"),
    "no group size": (lambda p: _edit_qcfg(p, drop=("group_size",)), r"lacks group_size\|q_group_size"),
    "group size 0": (lambda p: _edit_qcfg(p, group_size=0), "group_size must be -1 or a positive"),
    "group size true": (lambda p: _edit_qcfg(p, group_size=True), "group_size must be -1 or a positive"),
    "group size 100": (lambda p: _edit_qcfg(p, group_size=100), "group_size 100 does not divide in_features 768"),
    "group size 64": (lambda p: _edit_qcfg(p, group_size=64), r"down_proj'.qzeros .* expected I32 \[12, 32\]"),
    "zero_point missing": (lambda p: _edit_qcfg(p, drop=("zero_point",)), "lacks zero_point"),
    "zero_point string": (lambda p: _edit_qcfg(p, zero_point="yes"), "zero_point must be true/false"),
    "version not a string": (lambda p: _edit_qcfg(p, version=3), "must be a string"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_inconsistent_files_raise_format_error(artifact: Path, tmp_path: Path, case: str) -> None:
    damage, match = HOSTILE[case]
    path = _copy(artifact, tmp_path)
    damage(path)
    with pytest.raises(FormatError, match=match):
        read_awq(path)


@pytest.mark.parametrize(("fields", "match"), [({"zero_point": False}, "zero_point false"),
                                               ({"version": "gemv"}, "layout 'gemv'")])
def test_other_awq_layouts_are_unsupported(artifact: Path, tmp_path: Path, fields: dict, match: str) -> None:
    path = _copy(artifact, tmp_path)
    _edit_qcfg(path, **fields)
    with pytest.raises(UnsupportedError, match=match):
        read_awq(path)


# --- a real consumer: mlx-lm's AWQ importer (unpacks qweight/qzeros into MLX's affine layout) ----------------


@pytest.mark.parametrize("fixture", ["artifact", "skipping_artifact"])
def test_mlx_lm_imports_the_same_weights(request: pytest.FixtureRequest, fixture: str) -> None:
    mx = pytest.importorskip("mlx.core")
    nn = pytest.importorskip("mlx.nn")
    from mlx_lm.utils import load_model

    path: Path = request.getfixturevalue(fixture)
    ckpt = read_awq(path)
    dense = ckpt.dense_state_dict()
    model, config = load_model(path)  # quant_method "awq" → mlx_lm.utils._transform_awq_weights
    assert config["quantization"] == {"group_size": 128, "bits": 4}
    modules = dict(model.named_modules())
    for name in LINEARS:
        layer = modules[name]
        if name not in ckpt.quantized:
            assert type(layer) is nn.Linear, name  # kept float, in mlx-lm's model dtype (that of the scales)
            float16 = dense[f"{name}.weight"].half().float().numpy()
            assert np.array_equal(np.array(layer.weight.astype(mx.float32)), float16), name
            continue
        assert type(layer) is nn.QuantizedLinear, name
        qw = ckpt.quantized[name]
        ones = mx.ones(layer.scales.shape, dtype=mx.float32)
        codes = mx.dequantize(layer.weight, ones, mx.zeros_like(ones), group_size=128, bits=4)
        assert np.array_equal(np.array(codes), qw.codes.numpy()), name  # MLX unpacks our interleave exactly
        theirs = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=128, bits=4)
                          .astype(mx.float32))
        ours = dense[f"{name}.weight"].numpy()
        # mlx stores bias = -zero·scale in float16 and dequantizes in float16: two fp16 roundings
        zs = (qw.zeros.float() * qw.scales).repeat_interleave(128, dim=1).abs().numpy()
        assert (np.abs(theirs - ours) <= (np.abs(ours) + zs) * 2**-10 + 1e-7).all(), name

    model.set_dtype(mx.float32)
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = load_reference(path)(ids).logits[0].numpy()
    got = np.array(model(mx.array(ids.numpy().astype(np.int32)))[0])
    # same weights up to the fp16 biases (-zero·scale, exact for zero 8): ~1e-3 of the logit range here
    assert np.abs(got - expected).max() < 2.5e-3 * max(1.0, float(np.abs(expected).max()))

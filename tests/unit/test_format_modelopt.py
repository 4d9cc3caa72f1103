"""ModelOpt unified HF format: the int4 nibble layout byte by byte, exact FP8 / int4 round trips on the demo
model, every tensor's name, dtype and shape against FORMATS.md §4.1, the two JSON configs, a dense load through
transformers, writer refusals before any byte is written, and hostile files for the reader."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest
import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.modelopt import read_modelopt, write_modelopt
from bitsmith.formats.modelopt.packing import pack_int4_rows, unpack_int4_rows
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.models import build_causal_lm
from bitsmith.quantized import FP8Weight, GGMLWeight, Quantized, QuantizedWeight
from bitsmith.runtimes import artifact_format, load_reference
from bitsmith.schemes import Format, FP8Scheme, GGMLScheme, GGMLType, GPTQOptions, QuantScheme
from safetensors import safe_open
from safetensors.torch import load_file

from tests.unit.format_cases import assert_reader_refuses, assert_writer_refuses, damage_tensors

SOURCE = load_file(DEMO_MODEL / "model.safetensors")
LINEARS = sorted(name.removesuffix(".weight") for name in SOURCE if ".layers." in name and name.endswith("proj.weight"))
Q = "model.layers.0.self_attn.q_proj"
SYM = QuantScheme(bits=4, group_size=128, sym=True)
STATIC = FP8Scheme(per_channel=False, static_activations=True)
DYNAMIC = FP8Scheme(per_channel=True, static_activations=False)


def fp8(weight: torch.Tensor, scheme: FP8Scheme, input_absmax: float = 3.0) -> FP8Weight:
    """FP8 weights built directly (amax / 448 scales), independent of bitsmith's fp8 kernel."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 448 if scheme.per_channel else (w.abs().max() / 448).reshape(1)
    data = (w / scale[:, None] if scheme.per_channel else w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    input_scale = torch.tensor([input_absmax / 448]) if scheme.static_activations else None
    return FP8Weight(data=data, scale=scale.float(), scheme=scheme, input_scale=input_scale)


@cache
def _solve(kind: str, name: str) -> Quantized:
    weight = SOURCE[f"{name}.weight"]
    if kind == "int4":
        return quantize_rtn(weight.float(), SYM, name=name)
    return fp8(weight, STATIC if kind == "fp8" else DYNAMIC)


def solved(kind: str, names: list[str] | None = None) -> dict[str, Quantized]:
    return {name: _solve(kind, name) for name in (names if names is not None else LINEARS)}


def write(out: Path, quantized: dict[str, Quantized], **kwargs: object) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return write_modelopt(out, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions(),
                          **kwargs)  # type: ignore[arg-type]


def test_int4_nibbles_by_hand() -> None:
    """Rows 2i → low nibble, 2i+1 → high nibble, two's complement (FORMATS.md §4.1)."""
    q = torch.tensor([[-8, 0, 7], [7, -1, 1], [3, -3, -8], [0, 5, -2]], dtype=torch.int8)
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    assert packed.tolist() == [[0x78, 0xF0, 0x17], [0x03, 0x5D, 0xE8]]
    assert torch.equal(unpack_int4_rows(packed), q)
    every = torch.arange(-8, 8, dtype=torch.int8).repeat(16, 1)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(every.t().contiguous())), every.t())


@pytest.mark.parametrize("kind", ["fp8", "fp8_pc", "int4"])
def test_round_trip_and_tensor_layout(tmp_path: Path, kind: str) -> None:
    quantized = solved(kind)
    out = write(tmp_path / "art", quantized)
    ckpt = read_modelopt(out)
    dense = ckpt.dense_state_dict()
    assert set(dense) == set(SOURCE)
    for name, weight in quantized.items():
        assert torch.equal(dense[f"{name}.weight"], weight.dequantize()), name  # bitwise
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        raw = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    suffixes = {"fp8": ("weight", "weight_scale", "input_scale"), "fp8_pc": ("weight", "weight_scale"),
                "int4": ("weight", "weight_scale")}[kind]
    untouched = set(SOURCE) - {f"{name}.weight" for name in LINEARS}
    assert set(raw) == untouched | {f"{n}.{s}" for n in LINEARS for s in suffixes}
    for name in untouched:
        assert raw[name].dtype == SOURCE[name].dtype and torch.equal(raw[name], SOURCE[name]), name
    for name in LINEARS:
        n, k = SOURCE[f"{name}.weight"].shape
        w, s = raw[f"{name}.weight"], raw[f"{name}.weight_scale"]
        if kind == "int4":
            assert (w.dtype, tuple(w.shape)) == (torch.uint8, (n // 2, k))
            assert (s.dtype, tuple(s.shape)) == (torch.float32, (n, k // 128))
            assert torch.equal(s, quantized[name].scales)
        else:
            assert (w.dtype, tuple(w.shape)) == (torch.float8_e4m3fn, (n, k))
            assert s.dtype == torch.float32 and tuple(s.shape) == ((n,) if kind == "fp8_pc" else ())
        if kind == "fp8":
            assert raw[f"{name}.input_scale"].dtype == torch.float32 and raw[f"{name}.input_scale"].shape == ()
    algo = {"fp8": "FP8", "fp8_pc": "FP8_PER_CHANNEL_PER_TOKEN", "int4": "W4A16_AWQ"}[kind]
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())
    assert hf_quant["producer"]["name"] == "bitsmith"
    expected = {"quant_algo": algo, "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    if kind == "int4":
        expected.update(group_size=128, has_zero_point=False, pre_quant_scale=False)
    assert hf_quant["quantization"] == expected
    config = json.loads((out / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    assert config == json.loads((DEMO_MODEL / "config.json").read_text())
    assert (qcfg["quant_method"], qcfg["quant_algo"], qcfg["ignore"]) == ("modelopt", algo, ["lm_head"])
    assert qcfg["config_groups"]["group_0"]["targets"] == ["Linear"]
    if kind == "fp8":
        assert qcfg["config_groups"]["group_0"]["input_activations"] == {"dynamic": False, "num_bits": 8,
                                                                         "type": "float"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published per-channel FP8 artifact with a manifest, shared by read-only tests."""
    out = tmp_path_factory.mktemp("modelopt") / "art"
    quantized = solved("fp8_pc")
    handler = get_format(Format.MODELOPT)
    build_artifact(out, lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                                options=GPTQOptions()), format=Format.MODELOPT, recipe={})
    return out


def test_registry_manifest_and_dense_load(artifact: Path) -> None:
    assert get_format(Format.MODELOPT).read is read_modelopt
    assert verify_manifest(artifact).format is Format.MODELOPT and artifact_format(artifact) is Format.MODELOPT
    ckpt = read_modelopt(artifact)
    expected = build_causal_lm(DEMO_MODEL, {**SOURCE, **{f"{n}.weight": w.dequantize() for n, w in
                                                         ckpt.quantized.items()}})
    loaded = load_reference(artifact)  # transformers' LlamaForCausalLM with the checkpoint's dense weights
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids).logits, expected(ids).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_skipped_linears_are_excluded_and_copied(tmp_path: Path) -> None:
    skipped = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
               "model.layers.1.self_attn.v_proj", "model.layers.2.mlp.down_proj"]
    out = write(tmp_path / "art", solved("int4", [n for n in LINEARS if n not in skipped]))
    ckpt = read_modelopt(out)
    assert list(ckpt.params.exclude_modules) == [*skipped, "lm_head"]
    assert set(ckpt.quantized) == set(LINEARS) - set(skipped)
    for name in skipped:
        assert torch.equal(ckpt.tensors[f"{name}.weight"], SOURCE[f"{name}.weight"]), name


def test_sharded_output_reads_back(tmp_path: Path) -> None:
    quantized = solved("int4")
    out = write(tmp_path / "art", quantized, max_shard_bytes=2**20)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert all(torch.equal(read_modelopt(out).quantized[n].codes, qw.codes)  # type: ignore[union-attr]
               for n, qw in quantized.items())


def _ggml() -> dict[str, Quantized]:
    scheme = GGMLScheme(type=GGMLType.Q8_0)
    return {**solved("int4"), Q: GGMLWeight(data=torch.zeros(256, GGMLType.Q8_0.row_bytes(256), dtype=torch.uint8),
                                            scheme=scheme, in_features=256)}


def _with(q: dict[str, Quantized], name: str, change: Callable[[QuantizedWeight], QuantizedWeight]
          ) -> dict[str, Quantized]:
    weight = q[name]
    assert isinstance(weight, QuantizedWeight)
    return {**q, name: change(weight)}


def _rtn(scheme: QuantScheme) -> dict[str, Quantized]:
    return {n: quantize_rtn(SOURCE[f"{n}.weight"].float(), scheme, name=n) for n in LINEARS}


NAN = float("nan")
REFUSALS: dict[str, tuple[Callable[[], dict[str, Quantized]], type[Exception], str]] = {
    "ggml": (_ggml, FormatError, r"model.layers.0.self_attn.q_proj was solved onto the q8_0|Q8_0"),
    "asymmetric": (lambda: _rtn(QuantScheme(bits=4, group_size=128)), UnsupportedError,
                   r"asymmetric grids cannot be stored.*layer 'model.layers.0.mlp.down_proj'"),
    "8-bit": (lambda: _rtn(QuantScheme(bits=8, group_size=128, sym=True)), UnsupportedError, "not 8-bit: layer"),
    "group 32": (lambda: _rtn(QuantScheme(bits=4, group_size=32, sym=True)), UnsupportedError, "group_size 32"),
    "act-order": (lambda: _with(solved("int4"), Q, lambda w: replace(
        w, g_idx=w.g_idx[torch.randperm(256, generator=torch.Generator().manual_seed(0))])), UnsupportedError,
        r"q_proj'.*act-order"),
    "fp8 tensor dynamic": (lambda: {n: fp8(SOURCE[f"{n}.weight"], FP8Scheme(per_channel=False)) for n in LINEARS},
                           UnsupportedError, "fp8 tensor dynamic .* has no ModelOpt"),
    "fp8 channel static": (lambda: {n: fp8(SOURCE[f"{n}.weight"], FP8Scheme(static_activations=True))
                                    for n in LINEARS}, UnsupportedError, "fp8 channel static"),
    "mixed fp8 and int": (lambda: {**solved("int4"), Q: solved("fp8", [Q])[Q]}, UnsupportedError, "mix FP8"),
    "lm_head": (lambda: {**solved("int4"), "lm_head": solved("int4", [Q])[Q]}, UnsupportedError, "outside"),
    "partial qkv": (lambda: solved("fp8", [n for n in LINEARS if n != "model.layers.2.self_attn.k_proj"]),
                    UnsupportedError, "need all or none"),
    "nan fp8": (lambda: {**solved("fp8"), Q: replace(solved("fp8", [Q])[Q],  # type: ignore[type-var]
                                                     data=torch.full((256, 256), NAN).to(torch.float8_e4m3fn))},
                FormatError, "q_proj'.*NaN"),
    "nothing": (lambda: {}, ConfigError, "no quantized layers"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_writer_refuses_before_writing(tmp_path: Path, case: str) -> None:
    make, error, match = REFUSALS[case]
    assert_writer_refuses(tmp_path / "art", lambda out: write(out, make()), error, match)


# --- hostile files -----------------------------------------------------------------------------------------

L = "model.layers.1.self_attn.k_proj"


def _quant(**fields: object) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        data = json.loads((path / "hf_quant_config.json").read_text())
        data["quantization"].update(fields)
        (path / "hf_quant_config.json").write_text(json.dumps(data))
    return damage


def _drop_qcfg(path: Path) -> None:
    """Older ModelOpt exports carry no quantization_config in config.json; the reader takes them."""
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))


HOSTILE: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "no hf_quant_config": (lambda p: (p / "hf_quant_config.json").unlink(), FormatError, "no hf_quant_config.json"),
    "hf_quant_config not json": (lambda p: (p / "hf_quant_config.json").write_text("{"), FormatError, "not valid JSON"),
    "unknown algo": (_quant(quant_algo="FP9"), FormatError, "unknown quant_algo 'FP9'"),
    "algo not a string": (_quant(quant_algo=8), FormatError, "quant_algo must be a string"),
    "nvfp4": (_quant(quant_algo="NVFP4"), UnsupportedError, "'NVFP4' is a ModelOpt algorithm bitsmith does not"),
    "fp8 kv cache": (_quant(kv_cache_quant_algo="FP8"), UnsupportedError, "KV cache"),
    "exclude not a list": (_quant(exclude_modules="lm_head"), FormatError, "exclude_modules must be a list"),
    "quantized but excluded": (_quant(exclude_modules=["lm_head", "*k_proj"]), FormatError, "quantized but matches"),
    "algo disagrees with tensors": (lambda p: (_quant(quant_algo="FP8")(p), _drop_qcfg(p)), FormatError,
                                    r"down_proj'.weight_scale .* is F32 \[256\], expected .* \[\] or \[1\]"),
    "config algo disagrees": (lambda p: (p / "config.json").write_text(json.dumps({
        **json.loads((p / "config.json").read_text()), "quantization_config": {"quant_method": "modelopt",
                                                                              "quant_algo": "FP8"}})),
        FormatError, "disagrees with hf_quant_config.json"),
    "weight float": (damage_tensors(lambda t: t.update({f"{L}.weight": t[f"{L}.weight"].float()})), FormatError,
                     r"k_proj'.weight \(model.safetensors\) is F32, expected F8_E4M3"),
    "scale wrong shape": (damage_tensors(lambda t: t.update({f"{L}.weight_scale": t[f"{L}.weight_scale"][:5]})),
                          FormatError, r"weight_scale .* expected F32\|F16\|BF16 \[128\] or \[128, 1\]"),
    "scale nan": (damage_tensors(lambda t: t[f"{L}.weight_scale"].__setitem__(0, float("nan"))), FormatError,
                  "weight_scale must be finite and positive"),
    "scale negative": (damage_tensors(lambda t: t[f"{L}.weight_scale"].__setitem__(0, -1.0)), FormatError, "positive"),
    "fp8 nan": (damage_tensors(lambda t: t[f"{L}.weight"].view(torch.uint8).__setitem__((0, 0), 0x7F)), FormatError,
                "holds NaN"),
    "input scale on dynamic": (damage_tensors(lambda t: t.update({f"{L}.input_scale": torch.tensor(1.0)})), FormatError,
                               "scales activations per token"),
    "stray input scale": (damage_tensors(lambda t: t.update({"model.x.input_scale": torch.tensor(1.0)})), FormatError,
                          "model.x.input_scale belongs to no quantized linear"),
    "float linear not excluded": (damage_tensors(lambda t: (t.pop(f"{L}.weight_scale"),
                                                      t.update({f"{L}.weight": SOURCE[f"{L}.weight"]}))),
                                  FormatError, "is float but not in exclude_modules"),
    "kv scale": (damage_tensors(lambda t: t.update({f"{L}.k_scale": torch.tensor(1.0)})), UnsupportedError, "KV-cache"),
    "truncated": (lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:999]),
                  FormatError, "model.safetensors"),
    "no weights": (lambda p: (p / "model.safetensors").unlink(), FormatError, "has neither model.safetensors"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused(artifact: Path, tmp_path: Path, case: str) -> None:
    damage, error, match = HOSTILE[case]
    assert_reader_refuses(artifact, tmp_path, damage, read_modelopt, error, match)

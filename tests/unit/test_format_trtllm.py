"""TensorRT-LLM checkpoint: names, dtypes and shapes against FORMATS.md §4.2, the config, exact round trips
(per-tensor FP8 q/k/v within the documented requantization), the fused int4 bytes, a dense load through
transformers, writer refusals, and hostile files for the reader."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.modelopt.packing import pack_int4_rows
from bitsmith.formats.trtllm import read_trtllm, write_trtllm
from bitsmith.models import build_causal_lm
from bitsmith.quantized import FP8Weight, Quantized, QuantizedWeight
from bitsmith.schemes import Format, FP8Scheme, GPTQOptions, QuantScheme
from safetensors import safe_open
from safetensors.torch import load_file

from tests.unit.format_cases import assert_reader_refuses, assert_writer_refuses, damage_tensors
from tests.unit.test_format_modelopt import LINEARS, SOURCE, _ggml, solved

H, KV, HS, HIDDEN, FFN = 4, 2, 64, 256, 768


def write(out: Path, quantized: dict[str, Quantized]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return write_trtllm(out, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions())


def expected_tensors(kind: str) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor §4.2 says a 4-block demo checkpoint holds, with its dtype and shape."""
    bf16 = torch.bfloat16
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "transformer.vocab_embedding.weight": (bf16, (4096, HIDDEN)), "transformer.ln_f.weight": (bf16, (HIDDEN,)),
        "lm_head.weight": (bf16, (4096, HIDDEN))}
    for i in range(4):
        p = f"transformer.layers.{i}"
        out[f"{p}.input_layernorm.weight"] = out[f"{p}.post_layernorm.weight"] = (bf16, (HIDDEN,))
        for name, (n, k) in {"attention.qkv": ((H + 2 * KV) * HS, HIDDEN), "attention.dense": (HIDDEN, H * HS),
                             "mlp.fc": (FFN, HIDDEN), "mlp.gate": (FFN, HIDDEN), "mlp.proj": (HIDDEN, FFN)}.items():
            if kind == "int4":
                out[f"{p}.{name}.weight"] = (torch.int8, (n // 2, k))
                out[f"{p}.{name}.weights_scaling_factor"] = (torch.float32, (n, k // 128))
                continue
            out[f"{p}.{name}.weight"] = (torch.float8_e4m3fn, (n, k))
            if kind == "fp8":
                out[f"{p}.{name}.weights_scaling_factor"] = (torch.float32, (1,))
                out[f"{p}.{name}.activation_scaling_factor"] = (torch.float32, (1,))
            else:
                out[f"{p}.{name}.per_channel_scale"] = (torch.float32, (n,))
    return out


@pytest.mark.parametrize("kind", ["fp8", "fp8_pc", "int4"])
def test_tensors_config_and_round_trip(tmp_path: Path, kind: str) -> None:
    quantized = solved(kind)
    out = write(tmp_path / "art", quantized)
    with safe_open(str(out / "rank0.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        raw = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    assert {name: (t.dtype, tuple(t.shape)) for name, t in raw.items()} == expected_tensors(kind)
    assert torch.equal(raw["lm_head.weight"], SOURCE["model.embed_tokens.weight"])  # tied: copied
    config = json.loads((out / "config.json").read_text())
    algo = {"fp8": "FP8", "fp8_pc": "FP8_PER_CHANNEL_PER_TOKEN", "int4": "W4A16_AWQ"}[kind]
    assert config["quantization"] == {"quant_algo": algo, "kv_cache_quant_algo": None,
                                      "group_size": 128 if kind == "int4" else 64, "has_zero_point": False,
                                      "pre_quant_scale": False, "exclude_modules": ["lm_head"]}
    assert {k: config[k] for k in ("architecture", "dtype", "logits_dtype", "vocab_size", "hidden_size",
                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                   "head_size", "intermediate_size", "hidden_act", "norm_epsilon",
                                   "position_embedding_type", "rotary_base", "mapping")} == {
        "architecture": "LlamaForCausalLM", "dtype": "bfloat16", "logits_dtype": "float32", "vocab_size": 4096,
        "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_size": 64, "intermediate_size": 768, "hidden_act": "silu", "norm_epsilon": 1e-5,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": 10000.0,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}}
    ckpt = read_trtllm(out)
    assert get_format(Format.TRTLLM).read is read_trtllm
    dense = ckpt.dense_state_dict()
    assert set(dense) == set(SOURCE)
    for name in set(SOURCE) - {f"{n}.weight" for n in LINEARS}:
        assert torch.equal(dense[name], SOURCE[name].float()), name
    for name, weight in quantized.items():
        got, want = dense[f"{name}.weight"], weight.dequantize()
        if kind != "fp8" or not any(p in name for p in ("q_proj", "k_proj", "v_proj")):
            assert torch.equal(got, want), name  # bitwise: only per-tensor FP8 q/k/v are requantized
            continue
        assert isinstance(weight, FP8Weight)
        s_max = max(float(quantized[name.rsplit(".", 1)[0] + f".{p}"].scale) for p in ("q_proj", "k_proj", "v_proj"))
        assert ((got - want).abs() <= want.abs() / 16 + s_max * 2**-9).all(), name
        assert float(ckpt.quantized[name].scale) == s_max  # type: ignore[union-attr]


def test_fused_int4_qkv_bytes_are_the_packed_concatenation(tmp_path: Path) -> None:
    quantized = solved("int4")
    raw = load_file(write(tmp_path / "art", quantized) / "rank0.safetensors")
    parts = [quantized[f"model.layers.2.self_attn.{p}_proj"] for p in "qkv"]
    assert all(isinstance(p, QuantizedWeight) for p in parts)
    signed = torch.cat([p.codes.to(torch.int16) - 8 for p in parts]).to(torch.int8)  # type: ignore[union-attr]
    assert torch.equal(raw["transformer.layers.2.attention.qkv.weight"].view(torch.uint8), pack_int4_rows(signed))


def test_dense_load_matches_the_dequantized_model(tmp_path: Path) -> None:
    quantized = solved("fp8_pc")
    ckpt = read_trtllm(write(tmp_path / "art", quantized))
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(ckpt.hf_config()))
    got = build_causal_lm(model_dir, ckpt.dense_state_dict())
    want = build_causal_lm(DEMO_MODEL, {**SOURCE, **{f"{n}.weight": w.dequantize() for n, w in quantized.items()}})
    ids = torch.randint(0, 4096, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-5, rtol=1e-5)


def test_skipped_linears_use_trtllm_names(tmp_path: Path) -> None:
    skipped = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj",
               "model.layers.1.self_attn.v_proj", "model.layers.3.mlp.down_proj"]
    out = write(tmp_path / "art", solved("int4", [n for n in LINEARS if n not in skipped]))
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["exclude_modules"] == ["transformer.layers.1.attention.qkv",
                                                         "transformer.layers.3.mlp.proj", "lm_head"]
    ckpt = read_trtllm(out)
    assert set(ckpt.quantized) == set(LINEARS) - set(skipped)
    for name in skipped:
        assert torch.equal(ckpt.dense_state_dict()[f"{name}.weight"], SOURCE[f"{name}.weight"].float()), name


@pytest.mark.parametrize(("make", "error", "match"), [
    (_ggml, FormatError, "q_proj was solved onto"),
    (lambda: {n: quantize_rtn(SOURCE[f"{n}.weight"].float(), QuantScheme(bits=4, group_size=128), name=n)
              for n in LINEARS}, UnsupportedError, "asymmetric grids cannot be stored"),
    (lambda: {n: FP8Weight(data=torch.zeros(SOURCE[f"{n}.weight"].shape).to(torch.float8_e4m3fn),
                           scale=torch.ones(1), scheme=FP8Scheme(per_channel=False)) for n in LINEARS},
     UnsupportedError, "fp8 tensor dynamic"),
], ids=["ggml", "asym", "fp8-tensor-dynamic"])
def test_writer_refuses_before_writing(tmp_path: Path, make: Callable[[], dict[str, Quantized]],
                                       error: type[Exception], match: str) -> None:
    assert_writer_refuses(tmp_path / "art", lambda out: write(out, make()), error, match)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trtllm") / "art"
    out.mkdir()
    return write_trtllm(out, source_model_dir=DEMO_MODEL, quantized=solved("fp8"), options=GPTQOptions())


QKV = "transformer.layers.1.attention.qkv"


def _tensors(change: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    return damage_tensors(change, "rank0.safetensors")


def _config(**fields: object) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        config = json.loads((path / "config.json").read_text())
        for key, value in fields.items():
            if key.startswith("q_"):
                config["quantization"][key[2:]] = value
            else:
                config[key] = value
        (path / "config.json").write_text(json.dumps(config))
    return damage


HOSTILE: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "no config": (lambda p: (p / "config.json").unlink(), FormatError, "has no config.json"),
    "no rank file": (lambda p: (p / "rank0.safetensors").unlink(), FormatError, "has no rank0.safetensors"),
    "truncated": (lambda p: (p / "rank0.safetensors").write_bytes((p / "rank0.safetensors").read_bytes()[:999]),
                  FormatError, "rank0.safetensors"),
    "unknown architecture": (_config(architecture="GPT2LMHeadModel"), UnsupportedError, "GPT2LMHeadModel"),
    "absurd layers": (_config(num_hidden_layers=10**9), FormatError, "num_hidden_layers must be an integer"),
    "heads not a multiple": (_config(num_key_value_heads=3), FormatError, "not a multiple"),
    "nan epsilon": (_config(norm_epsilon=float("nan")), FormatError, "norm_epsilon"),
    "two ranks": (_config(mapping={"world_size": 2, "tp_size": 2, "pp_size": 1}), UnsupportedError, "single-rank"),
    "unknown algo": (_config(q_quant_algo="FP7"), FormatError, "unknown quant_algo 'FP7'"),
    "w4a8": (_config(q_quant_algo="W4A8_AWQ"), UnsupportedError, "'W4A8_AWQ' is not one bitsmith reads"),
    "zero point": (_config(q_has_zero_point=True), UnsupportedError, "has_zero_point true"),
    "qkv cut": (_tensors(lambda t: t.update({f"{QKV}.weight": t[f"{QKV}.weight"][:-1].contiguous()})), FormatError,
                r"qkv.weight' is F8_E4M3 \[511, 256\], expected F8_E4M3 \[512, 256\]"),
    "scale nan": (_tensors(lambda t: t[f"{QKV}.weights_scaling_factor"].fill_(float("nan"))), FormatError,
                  "weight scale must be finite and positive"),
    "fp8 nan": (_tensors(lambda t: t[f"{QKV}.weight"].view(torch.uint8).__setitem__((0, 0), 0xFF)), FormatError,
                "holds NaN"),
    "missing activation scale": (_tensors(lambda t: t.pop(f"{QKV}.activation_scaling_factor")), FormatError,
                                 "activation_scaling_factor' is missing"),
    "stray tensor": (_tensors(lambda t: t.update({"transformer.x": torch.zeros(1)})), FormatError,
                     "'transformer.x' is not part of"),
    "float linear not excluded": (_tensors(lambda t: (t.pop(f"{QKV}.weights_scaling_factor"),
                                                      t.pop(f"{QKV}.activation_scaling_factor"),
                                                      t.update({f"{QKV}.weight": torch.zeros(512, 256)}))),
                                  FormatError, "is float but not in exclude_modules"),
    "quantized but excluded": (_config(q_exclude_modules=["*qkv"]), FormatError, "quantized but matches"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_files_are_refused(artifact: Path, tmp_path: Path, case: str) -> None:
    damage, error, match = HOSTILE[case]
    assert_reader_refuses(artifact, tmp_path, damage, read_trtllm, error, match)

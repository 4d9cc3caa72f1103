"""MLX format: exact round trips of our codes, mlx's own dequantize and mlx-lm's model against our
dequantized reference, mlx-lm's loader, mixed precision (per-module entries, a linear kept in float),
refusals, and hostile files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.mlx import read_mlx
from bitsmith.formats.mlx.constants import WEIGHTS_FILE
from bitsmith.formats.mlx.runtime import MlxCausalLM
from bitsmith.manifest import build_artifact
from bitsmith.pipeline import quantize_in_process
from bitsmith.quantized import QuantizedWeight
from bitsmith.recipes import Recipe
from bitsmith.runtimes import artifact_format, load_reference
from bitsmith.schemes import Format, GPTQOptions, Method, QuantScheme
from safetensors.torch import load_file, save_file

from .solved import FLOAT, MIXED, TWO_BIT, rtn, solve

mx = pytest.importorskip("mlx.core")

SCHEMES = [QuantScheme(bits=4, group_size=64), QuantScheme(bits=3, group_size=32),
           QuantScheme(bits=2, group_size=128), QuantScheme(bits=8, group_size=64)]


def pack(out: Path, quantized: dict[str, QuantizedWeight], variant: str | None = None) -> Path:
    handler = get_format(Format.MLX)
    build_artifact(out, lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                                options=GPTQOptions(), variant=variant),
                   format=Format.MLX, recipe={})
    return out


@pytest.fixture(scope="module")
def rtn4() -> dict[str, QuantizedWeight]:
    return rtn(SCHEMES[0])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, rtn4: dict[str, QuantizedWeight]) -> Path:
    return pack(tmp_path_factory.mktemp("mlx") / "a", rtn4)


@pytest.fixture(scope="module")
def mixed() -> dict[str, QuantizedWeight]:
    return solve(MIXED)


@pytest.fixture(scope="module")
def mixed_artifact(tmp_path_factory: pytest.TempPathFactory, mixed: dict[str, QuantizedWeight]) -> Path:
    return pack(tmp_path_factory.mktemp("mlx") / "mixed", mixed)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_and_mlx_dequantize_agree(tmp_path: Path, scheme: QuantScheme) -> None:
    quantized = rtn(scheme)
    out = pack(tmp_path / "a", quantized, variant="float32")
    assert artifact_format(out) is Format.MLX
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == config["quantization_config"] == {
        "group_size": scheme.group_size, "bits": scheme.bits, "mode": "affine"}
    checkpoint = read_mlx(out)
    back = checkpoint.quantized_weights()
    raw = load_file(str(out / WEIGHTS_FILE))
    for name, qw in quantized.items():
        assert torch.equal(back[name].codes, qw.codes), name
        assert torch.equal(back[name].zeros, qw.zeros), name
        assert torch.equal(back[name].scales, qw.scales.float()), name
        # mlx's own unpacking of our uint32 stream gives our dequantized weight
        ours = qw.dequantize().numpy()
        theirs = mx.dequantize(mx.array(raw[f"{name}.weight"].numpy()), mx.array(raw[f"{name}.scales"].numpy()),
                               mx.array(raw[f"{name}.biases"].numpy()), group_size=scheme.group_size,
                               bits=scheme.bits)
        assert np.abs(np.array(theirs) - ours).max() <= 1e-5 * max(1.0, np.abs(ours).max()), name


def test_mlx_logits_within_quantization_noise_of_our_reference(artifact: Path) -> None:
    reference = load_reference(artifact)
    runtime = MlxCausalLM(artifact)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    got = runtime(ids).logits
    # float16 scales/biases as stored, float32 activations on the CPU backend: the same function
    assert (got - expected).abs().max() < 1e-3
    first = runtime(ids[:1, :40], use_cache=True)
    step = runtime(ids[:1, 40:], past_key_values=first.past_key_values, use_cache=True)
    assert (step.logits - expected[:1, 40:]).abs().max() < 1e-3


def test_mlx_lm_loader_accepts_the_directory(artifact: Path) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tokenizer = mlx_lm.load(str(artifact))
    ids = tokenizer.encode("In the beginning")
    logits = model(mx.array([ids]))
    assert logits.shape == (1, len(ids), 4096)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


def test_mixed_precision_round_trips_through_per_module_entries(
    mixed_artifact: Path, mixed: dict[str, QuantizedWeight]
) -> None:
    assert len(mixed) == 27 and FLOAT not in mixed
    config = json.loads((mixed_artifact / "config.json").read_text())
    block = config["quantization"]
    assert config["quantization_config"] == block
    expected = {"group_size": 64, "bits": 8, "mode": "affine"}  # the most common scheme: attention
    for name, qw in mixed.items():
        if "self_attn" not in name:
            expected[name] = {"group_size": qw.scheme.group_size, "bits": qw.scheme.bits, "mode": "affine"}
    assert block == expected and block[TWO_BIT]["bits"] == 2 and FLOAT not in block
    raw = load_file(str(mixed_artifact / WEIGHTS_FILE))
    source = load_file(str(DEMO_MODEL / "model.safetensors"))
    assert f"{FLOAT}.scales" not in raw and torch.equal(raw[f"{FLOAT}.weight"], source[f"{FLOAT}.weight"].half())

    checkpoint = read_mlx(mixed_artifact)
    assert checkpoint.scheme == QuantScheme(bits=8, group_size=64) and len(checkpoint.overrides) == 11
    back = checkpoint.quantized_weights()
    assert set(back) == set(mixed)
    for name, qw in mixed.items():
        got = back[name]
        assert got.scheme == QuantScheme(bits=qw.scheme.bits, group_size=qw.scheme.group_size), name  # no sym in MLX
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.zeros, qw.zeros), name
        assert torch.equal(got.scales, qw.scales.half().float()), name  # stored in the model dtype
    dense = checkpoint.dense_state_dict()
    assert torch.equal(dense[f"{FLOAT}.weight"], source[f"{FLOAT}.weight"].half().float())


def test_mixed_precision_runs_in_mlx_lm_and_our_runtime(mixed_artifact: Path) -> None:
    mlx_lm = pytest.importorskip("mlx_lm")
    reference = load_reference(mixed_artifact)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    runtime = MlxCausalLM(mixed_artifact)
    assert (runtime(ids).logits - expected).abs().max() < 1e-3
    first = runtime(ids[:1, :40], use_cache=True)
    step = runtime(ids[:1, 40:], past_key_values=first.past_key_values, use_cache=True)
    assert (step.logits - expected[:1, 40:]).abs().max() < 1e-3

    model, _ = mlx_lm.load(str(mixed_artifact))
    layers = model.model.layers
    layouts = {name: (type(m).__name__, getattr(m, "bits", None), getattr(m, "group_size", None))
               for name, m in [("q", layers[0].self_attn.q_proj), ("gate", layers[0].mlp.gate_proj),
                                ("two", layers[3].mlp.up_proj), ("float", layers[1].mlp.down_proj)]}
    assert layouts == {"q": ("QuantizedLinear", 8, 64), "gate": ("QuantizedLinear", 4, 128),
                       "two": ("QuantizedLinear", 2, 32), "float": ("Linear", None, None)}
    model.set_dtype(mx.float32)  # float16 activations are emulated on mlx's CPU backend: slow and noisy
    logits = torch.from_numpy(np.array(model(mx.array(ids.numpy().astype(np.int32)))))
    assert (logits - expected).abs().max() < 1e-3


def test_refuses_what_mlx_cannot_carry(tmp_path: Path, rtn4: dict[str, QuantizedWeight]) -> None:
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(UnsupportedError, match="per-channel"):
        pack(tmp_path / "pc", {name: rtn(QuantScheme(bits=4, group_size=-1))[name]})
    with pytest.raises(UnsupportedError, match=rf"{name}'.*group sizes \[32, 64, 128\], not 256"):
        pack(tmp_path / "g256", {**rtn4, name: rtn(QuantScheme(bits=4, group_size=256))[name]})
    qw = rtn4[name]
    shuffled = QuantizedWeight(codes=qw.codes, scales=qw.scales, zeros=qw.zeros,
                               g_idx=qw.g_idx[torch.randperm(qw.g_idx.numel())], scheme=qw.scheme)
    with pytest.raises(UnsupportedError, match=rf"{name}'.*act-order"):
        pack(tmp_path / "act", {**rtn4, name: shuffled})
    assert not any(tmp_path.iterdir())


def _copy(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(artifact, out)
    return out


def test_truncated_weights_are_a_format_error(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)
    data = (out / WEIGHTS_FILE).read_bytes()
    for broken in (data[:-64], data[:6], struct.pack("<Q", 1 << 40) + data[8:]):
        (out / WEIGHTS_FILE).write_bytes(broken)
        with pytest.raises(FormatError):
            read_mlx(out)


def test_wrong_shapes_and_foreign_biases_are_format_errors(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)
    tensors = load_file(str(out / WEIGHTS_FILE))
    name = "model.layers.2.mlp.down_proj"
    bad = dict(tensors, **{f"{name}.biases": tensors[f"{name}.biases"][:, :-1].contiguous()})
    save_file(bad, str(out / WEIGHTS_FILE), metadata={"format": "mlx"})
    with pytest.raises(FormatError, match=r"down_proj'.biases"):
        read_mlx(out)
    shifted = dict(tensors, **{f"{name}.biases": tensors[f"{name}.biases"] + tensors[f"{name}.scales"] * 0.5})
    save_file(shifted, str(out / WEIGHTS_FILE), metadata={"format": "mlx"})
    with pytest.raises(FormatError, match="not -scale"):
        read_mlx(out).quantized_weights()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(FormatError, match="metadata"):
        read_mlx(out)


def test_per_module_entries_are_validated(mixed_artifact: Path, tmp_path: Path) -> None:
    out = _copy(mixed_artifact, tmp_path)
    config = json.loads((out / "config.json").read_text())
    good = config["quantization"]
    entry = {"group_size": 32, "bits": 2, "mode": "affine"}
    cases = [
        (UnsupportedError, "mode", {**good, "mode": "mxfp4"}),
        (UnsupportedError, "bits must be one of", {**good, TWO_BIT: {**entry, "bits": 5}}),
        (UnsupportedError, "group_size must be one of", {**good, TWO_BIT: {**entry, "group_size": 16}}),
        (UnsupportedError, "unknown keys", {**good, TWO_BIT: {**entry, "quantize_input": True}}),
        (UnsupportedError, "objects", {**good, TWO_BIT: True}),
        (FormatError, "does not store quantized", {**good, FLOAT: {"group_size": 64, "bits": 8}}),
        (FormatError, "up_proj'.weight", {k: v for k, v in good.items() if k != TWO_BIT}),  # read as 8-bit
    ]
    for error, match, block in cases:
        (out / "config.json").write_text(json.dumps({**config, "quantization": block, "quantization_config": block}))
        with pytest.raises(error, match=match):
            read_mlx(out)


@pytest.mark.slow
def test_perplexity_equals_the_gptq_artifact_with_the_same_codes(tmp_path: Path) -> None:
    from dataclasses import replace

    from bitsmith.demo import EVAL_FILES
    from bitsmith.runtimes import evaluate_path

    scheme = QuantScheme(bits=4, group_size=64, min_zero=1)
    solved = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=16, seq_len=256,
                                 recipe=Recipe(scheme=scheme, method=Method.GPTQ)).quantized
    quantized = {name: replace(qw, g_idx=qw.g_idx.clone()) for name, qw in solved.items()}  # see test_onnx_format
    gptq = tmp_path / "gptq"
    build_artifact(gptq, lambda d: get_format(Format.GPTQ).write(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                                                 options=GPTQOptions()), format=Format.GPTQ, recipe={})
    mlx_dir = pack(tmp_path / "mlx", quantized)
    # mlx's Linux CPU backend runs at ~1 GFLOP/s: score the first 40k characters (~11k tokens) of each file
    files = []
    for file in EVAL_FILES:
        files.append(tmp_path / file.name)
        files[-1].write_text(file.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    for ours, theirs in zip(evaluate_path(mlx_dir, files), evaluate_path(gptq, files), strict=True):
        assert ours.tokens == theirs.tokens
        assert abs(ours.ppl / theirs.ppl - 1) < 0.005, (ours, theirs)

"""ONNX MatMulNBits format: exact round trips of our codes on the demo model, ONNX Runtime's logits
against our dequantized reference (with and without the KV cache), mixed precision (per-node bits and
block sizes, a linear kept as a float MatMul), refusals, and hostile files."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from bitsmith.demo import DEMO_MODEL, EVAL_FILES
from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.onnx import read_onnx
from bitsmith.formats.onnx.constants import DATA_FILE, MATMUL_NBITS, MODEL_FILE, MS_DOMAIN
from bitsmith.formats.onnx.runtime import OnnxCausalLM
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.pipeline import quantize_in_process
from bitsmith.quantized import QuantizedWeight
from bitsmith.recipes import Recipe
from bitsmith.runtimes import artifact_format, evaluate_path, load_reference
from bitsmith.schemes import Format, GPTQOptions, Method, QuantScheme
from safetensors.torch import load_file

from .solved import FLOAT, MIXED, TWO_BIT, rtn, solve

SCHEMES = [QuantScheme(bits=4, group_size=128), QuantScheme(bits=4, group_size=32, sym=True),
           QuantScheme(bits=8, group_size=64), QuantScheme(bits=2, group_size=64)]
def pack(out: Path, quantized: dict[str, QuantizedWeight], fmt: Format = Format.ONNX) -> Path:
    handler = get_format(fmt)
    build_artifact(out, lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized,
                                                options=GPTQOptions()), format=fmt, recipe={})
    return out


def own_g_idx(quantized: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The solver shares one g_idx tensor among the linears of a group, which the GPTQ writer's
    safetensors save refuses (shared memory); give each layer its own copy."""
    return {name: replace(qw, g_idx=qw.g_idx.clone()) for name, qw in quantized.items()}


@pytest.fixture(scope="module")
def rtn4() -> dict[str, QuantizedWeight]:
    return rtn(SCHEMES[0])


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, rtn4: dict[str, QuantizedWeight]) -> Path:
    return pack(tmp_path_factory.mktemp("onnx") / "a", rtn4)


@pytest.fixture(scope="module")
def mixed() -> dict[str, QuantizedWeight]:
    return solve(MIXED)


@pytest.fixture(scope="module")
def mixed_artifact(tmp_path_factory: pytest.TempPathFactory, mixed: dict[str, QuantizedWeight]) -> Path:
    return pack(tmp_path_factory.mktemp("onnx") / "mixed", mixed)


def _node_attrs(out: Path) -> dict[str, tuple[str, dict[str, object], list[str]]]:
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    return {n.name: (n.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}, list(n.input))
            for n in model.graph.node}


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
def test_round_trip_gives_back_our_codes(tmp_path: Path, scheme: QuantScheme) -> None:
    quantized = rtn(scheme)
    out = pack(tmp_path / "a", quantized)
    assert verify_manifest(out).format is Format.ONNX
    assert artifact_format(out) is Format.ONNX
    checkpoint = get_format(Format.ONNX).read(out)
    assert checkpoint.scheme.bits == scheme.bits and checkpoint.scheme.group_size == scheme.group_size
    assert set(checkpoint.quantized) == set(quantized) and len(quantized) == 28
    for name, qw in quantized.items():
        back = checkpoint.quantized[name]
        assert torch.equal(back.codes, qw.codes), name
        assert torch.equal(back.zeros, qw.zeros), name
        assert torch.equal(back.scales, qw.scales.float()), name
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == MATMUL_NBITS]
    assert len(nbits) == 28 and {n.domain for n in nbits} == {MS_DOMAIN}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    assert attrs["bits"] == scheme.bits and attrs["block_size"] == scheme.group_size
    assert (len(nbits[0].input) > 3 and nbits[0].input[3] != "") is not scheme.sym  # zero points iff asymmetric


def test_onnxruntime_logits_match_dequantized_reference(artifact: Path) -> None:
    reference = load_reference(artifact)
    runtime = OnnxCausalLM(artifact)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    got = runtime(ids).logits
    assert (got - expected).abs().max() < 1e-3
    first = runtime(ids[:, :40], use_cache=True)
    step = runtime(ids[:, 40:], past_key_values=first.past_key_values, use_cache=True)
    assert (step.logits - expected[:, 40:]).abs().max() < 1e-3


def test_mixed_precision_round_trips_with_each_node_on_its_own_scheme(
    mixed_artifact: Path, mixed: dict[str, QuantizedWeight]
) -> None:
    assert len(mixed) == 27 and FLOAT not in mixed
    qcfg = json.loads((mixed_artifact / "config.json").read_text())["quantization_config"]
    modules = {name: {"bits": qw.scheme.bits, "group_size": qw.scheme.group_size, "sym": qw.scheme.sym}
               for name, qw in mixed.items() if "self_attn" not in name}
    assert qcfg == {"quant_method": "onnx", "bits": 8, "group_size": 64, "sym": False,  # the most common scheme
                    "modules": modules, "not_quantized": [FLOAT]}
    assert modules[TWO_BIT] == {"bits": 2, "group_size": 32, "sym": True}
    nodes = _node_attrs(mixed_artifact)
    for name, qw in mixed.items():
        op, attrs, inputs = nodes[name]
        assert op == MATMUL_NBITS and (attrs["bits"], attrs["block_size"]) == (qw.scheme.bits, qw.scheme.group_size)
        assert (len(inputs) > 3 and inputs[3] != "") is not qw.scheme.sym, name  # zero points iff asymmetric
    assert nodes[FLOAT][0] == "MatMul"

    checkpoint = read_onnx(mixed_artifact)
    assert checkpoint.scheme == QuantScheme(bits=8, group_size=64) and checkpoint.not_quantized == (FLOAT,)
    assert set(checkpoint.quantized) == set(mixed)
    for name, qw in mixed.items():
        back = checkpoint.quantized[name]
        assert back.scheme == qw.scheme, name
        assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros), name
        assert torch.equal(back.scales, qw.scales.float()), name
    source = load_file(str(DEMO_MODEL / "model.safetensors"))
    assert torch.equal(checkpoint.dense_state_dict()[f"{FLOAT}.weight"], source[f"{FLOAT}.weight"].float())


def test_mixed_precision_runs_in_onnxruntime(mixed_artifact: Path) -> None:
    reference = load_reference(mixed_artifact)
    runtime = OnnxCausalLM(mixed_artifact)
    ids = torch.randint(0, 4096, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
    assert (runtime(ids).logits - expected).abs().max() < 1e-3
    first = runtime(ids[:, :40], use_cache=True)
    step = runtime(ids[:, 40:], past_key_values=first.past_key_values, use_cache=True)
    assert (step.logits - expected[:, 40:]).abs().max() < 1e-3


def test_refuses_what_matmulnbits_cannot_carry(tmp_path: Path, rtn4: dict[str, QuantizedWeight]) -> None:
    name = "model.layers.0.self_attn.q_proj"
    qw = rtn4[name]
    cases = {
        "per-channel": (QuantScheme(bits=4, group_size=-1), "per-channel"),
        "3-bit": (QuantScheme(bits=3, group_size=128), r"\[2, 4, 8\]-bit codes, not 3-bit"),
        "group 256": (QuantScheme(bits=4, group_size=256), r"group sizes \[32, 64, 128\], not 256"),
    }
    for what, (scheme, match) in cases.items():  # one layer the format cannot carry among ones it can
        with pytest.raises(UnsupportedError, match=rf"layer '{name}'.*{match}"):
            pack(tmp_path / what, {**rtn4, name: rtn(scheme)[name]})
    shuffled = QuantizedWeight(codes=qw.codes, scales=qw.scales, zeros=qw.zeros,
                               g_idx=qw.g_idx[torch.randperm(qw.g_idx.numel())], scheme=qw.scheme)
    with pytest.raises(UnsupportedError, match=rf"{name}'.*act-order"):
        pack(tmp_path / "act", {**rtn4, name: shuffled})
    with pytest.raises(ConfigError, match="not a linear"):
        pack(tmp_path / "embed", {"model.embed_tokens": qw})
    assert not any(tmp_path.iterdir())  # every refusal happened before anything was published


def _copy(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(artifact, out)
    return out


def test_truncated_or_garbage_graph_is_a_format_error(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)
    data = (out / MODEL_FILE).read_bytes()
    for broken in (data[: len(data) // 2], b"\x00garbage" * 100, b""):
        (out / MODEL_FILE).write_bytes(broken)
        with pytest.raises(FormatError):
            read_onnx(out)


def test_truncated_data_file_is_a_format_error(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)
    data = (out / DATA_FILE).read_bytes()
    (out / DATA_FILE).write_bytes(data[:-100])
    with pytest.raises(FormatError, match=DATA_FILE):
        read_onnx(out)


def _edit_graph(out: Path, edit) -> None:  # type: ignore[no-untyped-def]
    model = onnx.load(str(out / MODEL_FILE), load_external_data=False)
    edit(model)
    onnx.save_model(model, str(out / MODEL_FILE))


def test_wrong_initializer_shape_is_a_format_error(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)

    def reshape_scales(model: onnx.ModelProto) -> None:
        tensor = next(t for t in model.graph.initializer if t.name == "model.layers.1.mlp.up_proj.scales")
        n, blocks = tensor.dims
        del tensor.dims[:]
        tensor.dims.extend([blocks, n])

    _edit_graph(out, reshape_scales)
    with pytest.raises(FormatError, match=r"up_proj\.scales"):
        read_onnx(out)


def test_external_data_outside_the_artifact_is_refused(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)

    def point_outside(model: onnx.ModelProto) -> None:
        tensor = next(t for t in model.graph.initializer if t.name == "model.embed_tokens.weight")
        next(e for e in tensor.external_data if e.key == "location").value = "../../etc/passwd"

    _edit_graph(out, point_outside)
    with pytest.raises(FormatError, match="points at"):
        read_onnx(out)


def test_config_disagreeing_with_nodes_is_a_format_error(artifact: Path, tmp_path: Path) -> None:
    out = _copy(artifact, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["group_size"] = 64
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="disagree"):
        read_onnx(out)


def test_mixed_config_disagreeing_with_nodes_is_a_format_error(mixed_artifact: Path, tmp_path: Path) -> None:
    out = _copy(mixed_artifact, tmp_path)
    config = json.loads((out / "config.json").read_text())
    good = config["quantization_config"]
    modules = good["modules"]
    cases = [
        ("disagree", {**good, "modules": {k: v for k, v in modules.items() if k != TWO_BIT}}),
        ("disagree", {**good, "modules": {**modules, TWO_BIT: {**modules[TWO_BIT], "bits": 4}}}),
        ("exactly", {**good, "modules": {**modules, TWO_BIT: {"bits": 2, "group_size": 32}}}),
        ("bits must be one of", {**good, "modules": {**modules, TWO_BIT: {**modules[TWO_BIT], "bits": 3}}}),
        ("not MatMulNBits nodes", {**good, "modules": {**modules, "model.layers.9.mlp.up_proj": modules[TWO_BIT]}}),
        ("both in", {**good, "modules": {**modules, FLOAT: modules[TWO_BIT]}}),
        ("expected a float MatMul", {**good, "not_quantized": [FLOAT, "model.layers.0.self_attn.q_proj"]}),
        ("expected a float MatMul", {**good, "not_quantized": ["model.layers.9.mlp.down_proj"]}),
        ("list of distinct names", {**good, "not_quantized": FLOAT}),
    ]
    for match, qcfg in cases:
        (out / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))
        with pytest.raises(FormatError, match=match):
            read_onnx(out)


@pytest.mark.slow
def test_perplexity_equals_the_gptq_artifact_with_the_same_codes(tmp_path: Path) -> None:
    from bitsmith.demo import CALIB_FILES

    for scheme in (QuantScheme(bits=4, group_size=128, min_zero=1),):
        quantized = own_g_idx(quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=16, seq_len=256,
                                                  recipe=Recipe(scheme=scheme, method=Method.GPTQ)).quantized)
        gptq = pack(tmp_path / f"gptq{scheme.bits}", quantized, Format.GPTQ)
        onnx_dir = pack(tmp_path / f"onnx{scheme.bits}", quantized, Format.ONNX)
        ours = evaluate_path(onnx_dir, EVAL_FILES, seq_len=512)
        theirs = evaluate_path(gptq, EVAL_FILES, seq_len=512)
        for a, b in zip(ours, theirs, strict=True):
            assert a.tokens == b.tokens
            assert abs(a.ppl / b.ppl - 1) < 0.005, (scheme, a, b)
            assert np.isfinite(a.ppl)

"""compressed-tensors "float-quantized" (FP8 W8A8): bitwise write→read round trips on the demo model for
both FP8 schemes, int4 + FP8 mixed in one "mixed-precision" file, files as llm-compressor writes them
(bf16 scales, 0-dim input scales), refusals by the writer and the reader, and the real consumer — the
compressed_tensors package, through transformers' loader and its `ModelCompressor.decompress_model` —
rebuilding the same dense weights our reader gives."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from bitsmith.algos.fp8 import quantize_fp8
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.compressed_tensors import read_compressed_tensors, write_compressed_tensors
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.quantized import FP8Weight, GGMLWeight, Quantized, QuantizedWeight
from bitsmith.schemes import Format, FP8Scheme, GGMLScheme, GGMLType, GPTQOptions, QuantScheme
from safetensors import safe_open
from safetensors.torch import save_file

from tests.unit.format_cases import Tensors, all_tensors, assert_reader_refuses, qconfig

LOCAL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")  # fmt: skip
ALL_LINEARS = [f"model.layers.{b}.{local}" for b in range(4) for local in LOCAL]
Q = "model.layers.0.self_attn.q_proj"
MLP = "model.layers.1.mlp.down_proj"

CHANNEL_DYNAMIC = FP8Scheme(per_channel=True, static_activations=False)  # llm-compressor's FP8_DYNAMIC
TENSOR_STATIC = FP8Scheme(per_channel=False, static_activations=True)  # llm-compressor's FP8
W4 = QuantScheme(bits=4, group_size=128, sym=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def solve(source: Tensors, scheme_of: Callable[[str], FP8Scheme | QuantScheme | None]) -> dict[str, Quantized]:
    """FP8 (static layers get a made-up calibration absmax per layer) or RTN int per linear; None: float."""
    layers: dict[str, Quantized] = {}
    for i, name in enumerate(ALL_LINEARS):
        scheme = scheme_of(name)
        weight = source[f"{name}.weight"].float()
        if isinstance(scheme, FP8Scheme):
            absmax = 1.5 + i / 8 if scheme.static_activations else None
            layers[name] = quantize_fp8(weight, scheme, name=name, input_absmax=absmax)
        elif scheme is not None:
            layers[name] = quantize_rtn(weight, scheme, name=name)
    return layers


def publish(out: Path, quantized: dict[str, Quantized]) -> Path:
    """Stage and publish through the registry's writer, as the packer does."""
    handler = get_format(Format.COMPRESSED_TENSORS)
    build_artifact(
        out,
        lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions()),
        format=Format.COMPRESSED_TENSORS,
        recipe={"scheme": "fp8"},
    )
    return out


def write(out: Path, quantized: dict[str, Quantized]) -> Path:
    out.mkdir(parents=True)
    return write_compressed_tensors(out, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions())


def assert_same_fp8(got: FP8Weight | QuantizedWeight, want: Quantized, name: str) -> None:
    assert isinstance(got, FP8Weight) and isinstance(want, FP8Weight), name
    assert got.scheme == want.scheme, name
    assert torch.equal(got.data.view(torch.uint8), want.data.view(torch.uint8)), name  # bit for bit
    assert got.scale.dtype == torch.float32 and torch.equal(got.scale, want.scale), name
    if want.input_scale is None:
        assert got.input_scale is None, name
    else:
        assert got.input_scale is not None and torch.equal(got.input_scale, want.input_scale), name


# --- the real consumer ------------------------------------------------------------------------------


def transformers_dense(path: Path) -> Tensors:
    """What users run: transformers loads the compressed checkpoint through compressed-tensors (its config
    parser, its target/ignore matching, its compressors), then `ModelCompressor.decompress_model`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    quantizer: Any = model.hf_quantizer
    quantizer.compressor.decompress_model(model)
    return {name: t.detach() for name, t in model.state_dict().items()}


def assert_consumer_agrees(path: Path) -> None:
    """Every quantized linear decompresses to exactly our dense weight; nothing else differs either."""
    theirs = transformers_dense(path)
    ckpt = read_compressed_tensors(path)
    ours = ckpt.dense_state_dict(torch.float32)
    for name in ckpt.quantized:
        assert torch.equal(theirs[f"{name}.weight"], ours[f"{name}.weight"]), name
    for name, tensor in ours.items():
        assert torch.equal(theirs[name], tensor), name


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [CHANNEL_DYNAMIC, TENSOR_STATIC], ids=lambda s: s.label.replace(" ", "-"))
def test_fp8_round_trip_is_bitwise_and_the_consumer_agrees(tmp_path: Path, source: Tensors, scheme: FP8Scheme) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    quantized = solve(source, lambda name: scheme)
    out = publish(tmp_path / "art", quantized)
    assert verify_manifest(out).format is Format.COMPRESSED_TENSORS

    qcfg = qconfig(out)
    assert qcfg["format"] == "float-quantized" and qcfg["ignore"] == ["lm_head"]
    assert list(qcfg["config_groups"]) == ["group_0"]
    group = qcfg["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "float-quantized"
    weights, inputs = group["weights"], group["input_activations"]
    assert (weights["type"], weights["num_bits"], weights["symmetric"]) == ("float", 8, True)
    assert weights["group_size"] is None
    assert weights["strategy"] == ("channel" if scheme.per_channel else "tensor") and weights["dynamic"] is False
    if scheme.static_activations:
        assert inputs == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                          "strategy": "tensor", "dynamic": False, "observer": "minmax"}  # fmt: skip
    else:
        assert inputs == {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None,
                          "strategy": "token", "dynamic": True}  # fmt: skip
    parsed = QuantizationConfig.model_validate(qcfg).config_groups["group_0"]  # extra keys are forbidden there
    assert parsed.input_activations is not None and parsed.input_activations.dynamic is not scheme.static_activations

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    for name, w in quantized.items():
        assert isinstance(w, FP8Weight)
        n, k = w.shape
        assert stored[f"{name}.weight"].dtype == torch.float8_e4m3fn and stored[f"{name}.weight"].shape == (n, k)
        scale = stored[f"{name}.weight_scale"]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == ((n, 1) if scheme.per_channel else (1,))
        if scheme.static_activations:
            assert (stored[f"{name}.input_scale"].dtype, tuple(stored[f"{name}.input_scale"].shape)) == (
                torch.float32, (1,),
            )  # fmt: skip
        else:
            assert f"{name}.input_scale" not in stored
        assert f"{name}.weight_zero_point" not in stored and f"{name}.weight_packed" not in stored

    # Why float32 scales: compressed-tensors dequantizes in the scale dtype, so the stored float32 scale gives
    # exactly `FP8Weight.dequantize()`; a bf16 copy (llm-compressor's choice) would move the weights.
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    for name, w in quantized.items():
        state = {"weight": stored[f"{name}.weight"], "weight_scale": stored[f"{name}.weight_scale"]}
        assert torch.equal(compressor.decompress(state, parsed)["weight"], w.dequantize()), name
    state = {"weight": stored[f"{Q}.weight"], "weight_scale": stored[f"{Q}.weight_scale"].bfloat16()}
    assert not torch.equal(compressor.decompress(state, parsed)["weight"].float(), quantized[Q].dequantize())

    ckpt = read_compressed_tensors(out)
    assert set(ckpt.quantized) == set(quantized)
    dense = ckpt.dense_state_dict(torch.float32)
    for name, w in quantized.items():
        assert_same_fp8(ckpt.quantized[name], w, name)
        assert ckpt.scale_dtypes[name] == torch.float32
        assert torch.equal(dense[f"{name}.weight"], w.dequantize()), name  # exactly our FP8Weight
    assert torch.equal(dense["model.embed_tokens.weight"], source["model.embed_tokens.weight"].float())
    assert_consumer_agrees(out)


def test_int4_mlp_and_fp8_attention_in_one_mixed_precision_file(tmp_path: Path, source: Tensors) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    skipped = "model.layers.2.mlp.up_proj"
    quantized = solve(source, lambda n: None if n == skipped else TENSOR_STATIC if "self_attn" in n else W4)
    out = write(tmp_path / "art", quantized)

    qcfg = qconfig(out)
    assert qcfg["format"] == "mixed-precision" and qcfg["ignore"] == ["lm_head", skipped]
    groups = qcfg["config_groups"]
    assert [g["format"] for g in groups.values()] == ["pack-quantized", "float-quantized"]
    assert groups["group_0"]["targets"] == sorted(n for n in ALL_LINEARS if "mlp" in n and n != skipped)
    assert groups["group_0"]["input_activations"] is None
    assert groups["group_1"]["targets"] == ["Linear"]  # 16 attention linears outnumber 11 MLP ones
    QuantizationConfig.model_validate(qcfg)

    ckpt = read_compressed_tensors(out)
    assert set(ckpt.quantized) == set(quantized) and skipped not in ckpt.quantized
    for name, want in quantized.items():
        got = ckpt.quantized[name]
        if isinstance(want, FP8Weight):
            assert_same_fp8(got, want, name)
            assert ckpt.layer_groups[name] == "group_1"
        else:
            assert isinstance(got, QuantizedWeight) and isinstance(want, QuantizedWeight)
            assert torch.equal(got.codes, want.codes) and got.scheme == W4, name
            assert torch.equal(got.scales, want.scales.bfloat16().float()), name  # int scales: weight dtype
            assert ckpt.layer_groups[name] == "group_0"
    assert torch.equal(ckpt.tensors[f"{skipped}.weight"], source[f"{skipped}.weight"])
    assert_consumer_agrees(out)  # transformers loads the bf16 int4 scales into float32 params: exact products


def test_fp8_layers_of_both_kinds_make_two_float_quantized_groups(tmp_path: Path, source: Tensors) -> None:
    quantized = solve(source, lambda n: TENSOR_STATIC if n.endswith("q_proj") else CHANNEL_DYNAMIC)
    out = write(tmp_path / "art", quantized)
    qcfg = qconfig(out)
    assert qcfg["format"] == "float-quantized"
    groups = list(qcfg["config_groups"].values())
    assert groups[0]["targets"] == [f"model.layers.{b}.self_attn.q_proj" for b in range(4)]
    assert groups[0]["input_activations"]["strategy"] == "tensor" and groups[1]["targets"] == ["Linear"]
    ckpt = read_compressed_tensors(out)
    for name, want in quantized.items():
        assert_same_fp8(ckpt.quantized[name], want, name)


# --- llm-compressor's own files -----------------------------------------------------------------------


def llmc_fp8_checkpoint(out: Path, source: Tensors, preset: str, *, scalar_input_scale: bool) -> Path:
    """An FP8 checkpoint as llm-compressor saves one, made by compressed-tensors itself: the preset's
    scheme, its qparam math (scales in the weight's dtype, bf16), its float-quantized compressor, and
    config.json's block as `ModelCompressor.update_config` writes it."""
    import compressed_tensors
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme(preset, ["Linear"])
    scheme.format = "float-quantized"
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    args = scheme.weights
    assert args is not None
    tensors: Tensors = {}
    for i, (name, tensor) in enumerate(sorted(source.items())):
        prefix = name.removesuffix(".weight")
        if prefix not in ALL_LINEARS:
            tensors[name] = tensor
            continue
        w = tensor.float()
        low, high = (w.amin(1, keepdim=True), w.amax(1, keepdim=True)) if args.strategy == "channel" else (
            w.amin().reshape(1), w.amax().reshape(1))  # fmt: skip
        scale, zero_point = calculate_qparams(low, high, args)
        state = {"weight": tensor, "weight_scale": scale.to(tensor.dtype), "weight_zero_point": zero_point}
        compressed = compressor.compress(state, scheme)
        tensors.update({f"{prefix}.{key}": value.contiguous() for key, value in compressed.items()})
        if scheme.input_activations is not None and not scheme.input_activations.dynamic:
            input_scale = torch.tensor([0.01 + i / 1000], dtype=tensor.dtype)
            tensors[f"{prefix}.input_scale"] = input_scale.reshape(()) if scalar_input_scale else input_scale
    ct_config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        format="float-quantized",
        quantization_status="compressed",
    )
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    config["quantization_config"] = {
        "version": compressed_tensors.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
        "transform_config": {}, **ct_config.model_dump(mode="json", exclude={"quant_method"}),
    }  # fmt: skip
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out


@pytest.mark.parametrize(("preset", "scalar_input_scale"), [("FP8", False), ("FP8", True), ("FP8_DYNAMIC", False)])
def test_reads_what_llm_compressor_writes(
    tmp_path: Path, source: Tensors, preset: str, scalar_input_scale: bool
) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    out = llmc_fp8_checkpoint(tmp_path / "llmc", source, preset, scalar_input_scale=scalar_input_scale)
    raw = all_tensors(out)
    ckpt = read_compressed_tensors(out)
    assert set(ckpt.quantized) == set(ALL_LINEARS)
    static = preset == "FP8"
    for name, got in ckpt.quantized.items():
        assert isinstance(got, FP8Weight), name
        assert got.scheme == FP8Scheme(per_channel=not static, static_activations=static), name
        assert ckpt.scale_dtypes[name] == torch.bfloat16, name
        assert torch.equal(got.data.view(torch.uint8), raw[f"{name}.weight"].view(torch.uint8)), name
        assert torch.equal(got.scale, raw[f"{name}.weight_scale"].float().reshape(-1)), name
        if static:
            assert got.input_scale is not None, name
            assert torch.equal(got.input_scale, raw[f"{name}.input_scale"].float().reshape(1)), name
    # compressed-tensors' own decompressor, per module, in the scale dtype (bf16): the same dense weights
    scheme = QuantizationConfig.model_validate(qconfig(out)).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry("float-quantized")
    dense = ckpt.dense_state_dict(torch.bfloat16)
    for name in ALL_LINEARS:
        state = {"weight": raw[f"{name}.weight"], "weight_scale": raw[f"{name}.weight_scale"]}
        theirs = compressor.decompress(state, scheme)["weight"]
        assert theirs.dtype == torch.bfloat16 and torch.equal(theirs, dense[f"{name}.weight"]), name
    # and they are the demo weights within e4m3's rounding (3 mantissa bits: ≤ 1/16 of the value, plus the
    # subnormal step scale·2^-9 near zero)
    w = source[f"{Q}.weight"].float()
    got = ckpt.quantized[Q]
    assert isinstance(got, FP8Weight)
    step = got.scale.max() * 2**-9
    assert bool(((dense[f"{Q}.weight"].float() - w).abs() <= w.abs() / 16 + step + w.abs() * 2**-8).all())


# --- refusals -----------------------------------------------------------------------------------------


def _fp8(source: Tensors, name: str = Q, scheme: FP8Scheme = TENSOR_STATIC) -> FP8Weight:
    return quantize_fp8(source[f"{name}.weight"].float(), scheme, name=name, input_absmax=3.0)


def _forced(w: FP8Weight, **fields: Any) -> FP8Weight:
    """A layer whose fields bypass FP8Weight's own checks, as a corrupted store or wire could deliver."""
    for key, value in fields.items():
        object.__setattr__(w, key, value)
    return w


def _nan_data(source: Tensors) -> FP8Weight:
    w = _fp8(source)
    data = w.data.clone()
    data.view(torch.uint8)[3, 5] = 0x7F
    return _forced(w, data=data)


WRITER_REFUSALS: dict[str, tuple[Callable[[Tensors], dict[str, Quantized]], type[Exception], str]] = {
    "ggml weight": (
        lambda s: {Q: _fp8(s), MLP: GGMLWeight(data=torch.zeros(256, GGMLType.Q8_0.row_bytes(768), dtype=torch.uint8),
                                               scheme=GGMLScheme(type=GGMLType.Q8_0), in_features=768)},
        FormatError, "down_proj was solved onto the Q8_0 grid",
    ),
    "nan scale": (lambda s: {Q: _forced(_fp8(s), scale=torch.tensor([float("nan")]))}, FormatError,
                  "q_proj'.*weight scales must be finite and > 0"),
    "zero scale": (lambda s: {Q: _forced(_fp8(s, scheme=CHANNEL_DYNAMIC), scale=torch.zeros(256))}, FormatError,
                   "weight scales must be finite"),
    "inf input scale": (lambda s: {Q: _forced(_fp8(s), input_scale=torch.tensor([float("inf")]))}, FormatError,
                        "input_scale must be finite"),
    "missing input scale": (lambda s: {Q: _forced(_fp8(s), input_scale=None)}, FormatError,
                            "static activations need a float32 input_scale"),
    "nan data": (lambda s: {Q: _nan_data(s)}, FormatError, "FP8 data contains NaN"),
    "per-channel scale of the wrong length": (
        lambda s: {Q: _forced(_fp8(s, scheme=CHANNEL_DYNAMIC), scale=torch.ones(255))}, FormatError,
        r"needs a float32 scale \[256\]",
    ),
    "data shape differs from the source": (
        lambda s: {Q: _fp8(s, name="model.layers.0.self_attn.k_proj")}, ConfigError,
        r"source weight is \[256, 256\], FP8 data is \[128, 256\]",
    ),
    "not a linear": (
        lambda s: {"model.embed_tokens": _fp8(s, name="model.embed_tokens")}, ConfigError, "not an nn.Linear",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(WRITER_REFUSALS))
def test_writer_refuses_bad_fp8_layers_before_writing(tmp_path: Path, source: Tensors, case: str) -> None:
    make, error, match = WRITER_REFUSALS[case]
    out = tmp_path / "art"
    out.mkdir()
    with pytest.raises(error, match=match):
        write_compressed_tensors(out, source_model_dir=DEMO_MODEL, quantized=make(source), options=GPTQOptions())
    assert not any(out.iterdir())


@pytest.fixture(scope="module")
def fp8_artifact(tmp_path_factory: pytest.TempPathFactory, source: Tensors) -> Path:
    """Attention FP8 tensor-static, MLP FP8 channel-dynamic: two float-quantized groups."""
    quantized = solve(source, lambda n: TENSOR_STATIC if "self_attn" in n else CHANNEL_DYNAMIC)
    return write(tmp_path_factory.mktemp("ct-fp8") / "art", quantized)


def _edit_config(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads((path / "config.json").read_text())
    change(data["quantization_config"])
    (path / "config.json").write_text(json.dumps(data))


def _static_group(q: dict[str, Any]) -> dict[str, Any]:
    groups = q["config_groups"].values()
    group: dict[str, Any] = next(g for g in groups if g["input_activations"]["strategy"] == "tensor")
    return group


def _edit_inputs(**fields: Any) -> Callable[[Path], None]:
    return lambda p: _edit_config(p, lambda q: _static_group(q)["input_activations"].update(fields))


def _edit_weights(**fields: Any) -> Callable[[Path], None]:
    return lambda p: _edit_config(p, lambda q: _static_group(q)["weights"].update(fields))


def _rewrite(change: Callable[[Tensors], object]) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        tensors = all_tensors(path)
        change(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    return damage


def _set(name: str, value: Callable[[Tensors], torch.Tensor]) -> Callable[[Path], None]:
    return _rewrite(lambda t: t.update({name: value(t)}))


def _nan_stored(t: Tensors) -> None:
    t[f"{Q}.weight"].view(torch.uint8)[0, 0] = 0xFF


K = "model.layers.0.self_attn.k_proj"
READER_REFUSALS: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "unknown activation strategy": (_edit_inputs(strategy="sideways"), FormatError, "unknown strategy 'sideways'"),
    "per-head activations": (_edit_inputs(strategy="attn_head"), UnsupportedError, "strategy 'attn_head'"),
    "static per-token activations": (_edit_inputs(strategy="token"), UnsupportedError, "strategy 'token' with dynamic"),
    "dynamic per-tensor activations": (_edit_inputs(dynamic=True), UnsupportedError, "'tensor' with dynamic=True"),
    "local dynamic activations": (_edit_inputs(strategy="token", dynamic="local"), UnsupportedError, "'local'"),
    "int8 activations": (_edit_inputs(type="int"), UnsupportedError, "8-bit int input_activations"),
    "asymmetric activations": (_edit_inputs(symmetric=False), UnsupportedError, "asymmetric FP8 input_activations"),
    "unknown activation key": (_edit_inputs(scale="max"), FormatError, r"unknown keys \['scale'\]"),
    "no activations": (
        lambda p: _edit_config(p, lambda q: _static_group(q).update(input_activations=None)),
        UnsupportedError, "without input_activations",
    ),
    "output activations": (
        lambda p: _edit_config(p, lambda q: _static_group(q).update(output_activations={"num_bits": 8})),
        UnsupportedError, "output_activations are quantized",
    ),
    "block weights": (
        _edit_weights(strategy="block", block_structure=[128, 128]), UnsupportedError, "block-quantized FP8 weights",
    ),
    "group weights": (_edit_weights(strategy="group", group_size=128), UnsupportedError, "in groups of 128"),
    "int weights in a float-quantized group": (_edit_weights(type="int"), UnsupportedError, "8-bit int weights"),
    "fp4 weights": (_edit_weights(num_bits=4), UnsupportedError, "4-bit float weights"),
    "kv cache": (
        lambda p: _edit_config(p, lambda q: q.update(kv_cache_scheme={"num_bits": 8, "type": "float"})),
        UnsupportedError, "kv_cache_scheme",
    ),
    "float weights in a pack-quantized group": (
        lambda p: _edit_config(p, lambda q: _static_group(q).update(format="pack-quantized")),
        UnsupportedError, "input_activations are quantized",
    ),
    "weight stored bf16": (_set(f"{Q}.weight", lambda t: t[f"{Q}.weight"].bfloat16()), FormatError,
                           r"q_proj'.weight .* is BF16 \[256, 256\], expected F8_E4M3"),
    "per-tensor scale per channel": (_set(f"{Q}.weight_scale", lambda t: torch.ones(256, 1)), FormatError,
                                     r"weight_scale .* is F32 \[256, 1\], expected .*\[1\] or \[\]"),
    "per-channel scale per tensor": (_set(f"{MLP}.weight_scale", lambda t: torch.ones(1)), FormatError,
                                     r"down_proj'.weight_scale .* expected .*\[256, 1\] or \[256\]"),
    "input scale of two": (_set(f"{Q}.input_scale", lambda t: torch.ones(2)), FormatError, r"input_scale .* F32 \[2\]"),
    "input scale missing": (_rewrite(lambda t: t.pop(f"{Q}.input_scale")), FormatError, "input_scale is missing"),
    "input scale on a dynamic layer": (_set(f"{MLP}.input_scale", lambda t: torch.ones(1)), FormatError,
                                       "input_scale present but the group's activations are dynamic"),
    "zero point": (_set(f"{Q}.weight_zero_point", lambda t: torch.zeros(1, dtype=torch.int32)), FormatError,
                   "weight_zero_point present in a float-quantized"),
    "nan in data": (_rewrite(_nan_stored), FormatError, "q_proj'.weight contains NaN"),
    "zero scale": (_set(f"{K}.weight_scale", lambda t: torch.zeros(1)), FormatError, "must be finite and > 0"),
    "negative input scale": (_set(f"{K}.input_scale", lambda t: -torch.ones(1)), FormatError,
                             "input_scale must be finite and > 0"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(READER_REFUSALS))
def test_reader_refuses_unsupported_or_inconsistent_fp8_files(fp8_artifact: Path, tmp_path: Path, case: str) -> None:
    damage, error, match = READER_REFUSALS[case]
    assert_reader_refuses(fp8_artifact, tmp_path, damage, read_compressed_tensors, error, match)


def test_reader_accepts_the_fixture_unchanged(fp8_artifact: Path) -> None:
    """The damages above are what makes each copy fail."""
    ckpt = read_compressed_tensors(fp8_artifact)
    assert {type(w) for w in ckpt.quantized.values()} == {FP8Weight}

"""compressed-tensors "pack-quantized": exact write→read round trips on the demo model, mixed precision,
skipped linears, act-order, dense replacements, refusals, hostile files, and the real consumer (the
compressed_tensors package, directly and through transformers) decompressing what we write and
writing what we read."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from bitsmith.algos.rtn import quantize_rtn
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.compressed_tensors import read_compressed_tensors, write_compressed_tensors
from bitsmith.formats.compressed_tensors.constants import LEGACY_ACTORDER_VERSION, WRITTEN_VERSION
from bitsmith.formats.compressed_tensors.matching import resolve_group
from bitsmith.formats.compressed_tensors.packing import pack_rows, unpack_rows
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import Format, GPTQOptions, QuantScheme
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.unit.format_cases import Tensors, all_tensors, assert_reader_refuses, damage_tensors, qconfig

LOCAL_SHAPES = {  # block-local linear -> (out N, in K) of the demo model
    "self_attn.q_proj": (256, 256),
    "self_attn.k_proj": (128, 256),
    "self_attn.v_proj": (128, 256),
    "self_attn.o_proj": (256, 256),
    "mlp.gate_proj": (768, 256),
    "mlp.up_proj": (768, 256),
    "mlp.down_proj": (256, 768),
}
ALL_LINEARS = [f"model.layers.{b}.{local}" for b in range(4) for local in LOCAL_SHAPES]
SKIPPED = "model.layers.2.mlp.up_proj"
Q = "model.layers.0.self_attn.q_proj"

W4_SYM = QuantScheme(bits=4, group_size=128, sym=True)
W4_ASYM = QuantScheme(bits=4, group_size=128, sym=False)
W8_SYM = QuantScheme(bits=8, group_size=128, sym=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def rtn_layers(source: Tensors, scheme_of: Callable[[str], QuantScheme | None]) -> dict[str, QuantizedWeight]:
    """RTN on the demo weights; `scheme_of(name)` None leaves the linear in float."""
    layers = {}
    for name in ALL_LINEARS:
        scheme = scheme_of(name)
        if scheme is not None:
            layers[name] = quantize_rtn(source[f"{name}.weight"].float(), scheme, name=name)
    return layers


def mixed(name: str) -> QuantScheme | None:
    """Attention 8-bit sym, MLP 4-bit asym, one MLP linear skipped."""
    if name == SKIPPED:
        return None
    return W8_SYM if "self_attn" in name else W4_ASYM


def random_qw(n: int, k: int, scheme: QuantScheme, *, act_order: bool = False, seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    size, groups = scheme.effective_group_size(k), scheme.groups(k)
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    mid = 1 << (scheme.bits - 1)
    zeros = torch.randint(0, scheme.maxq + 1, (n, groups), generator=gen)
    if scheme.sym:
        zeros = torch.full((n, groups), mid)
    return QuantizedWeight(
        codes=torch.randint(0, scheme.maxq + 1, (n, k), generator=gen).to(torch.uint8),
        scales=torch.rand(n, groups, generator=gen) * 0.05 + 1e-3,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        scheme=scheme,
    )


def random_layers(scheme: QuantScheme, names: list[str], *, act_order: bool = False) -> dict[str, QuantizedWeight]:
    return {
        name: random_qw(*LOCAL_SHAPES[name.split(".", 3)[3]], scheme, act_order=act_order, seed=i)
        for i, name in enumerate(names)
    }


def write(out: Path, quantized: dict[str, QuantizedWeight], **kwargs: Any) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return write_compressed_tensors(
        out, source_model_dir=kwargs.pop("source_model_dir", DEMO_MODEL), quantized=quantized,
        options=kwargs.pop("options", GPTQOptions()), **kwargs,
    )  # fmt: skip


def expected_dense(qw: QuantizedWeight, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(code - zero)·scale with the scale as stored, exact in float32."""
    idx = qw.g_idx.long()
    scales = qw.scales.to(scale_dtype).float()[:, idx]
    return (qw.codes.float() - qw.zeros.float()[:, idx]) * scales


# --- the real consumer ------------------------------------------------------------------------------


def ct_decompress(path: Path) -> Tensors:
    """compressed-tensors' own view of the artifact: its config parser, its target/ignore matching
    (`apply_quantization_config` on the model) and its pack-quantized decompressor, per module."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    ct_config = QuantizationConfig.model_validate(config.pop("quantization_config"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    apply_quantization_config(model, ct_config, show_progress=False)
    tensors = all_tensors(path)
    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        state = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.rpartition(".")[0] == name}
        state.pop("bias", None)
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        out[name] = compressor.decompress(state, scheme)["weight"]
    return out


def assert_consumer_agrees(path: Path) -> None:
    ckpt = read_compressed_tensors(path)
    theirs = ct_decompress(path)
    assert set(theirs) == set(ckpt.quantized)
    for name, weight in theirs.items():
        ours = ckpt.dense_state_dict(weight.dtype)[f"{name}.weight"]
        assert weight.dtype == ckpt.scale_dtypes[name], name
        assert torch.equal(weight, ours), name


@pytest.fixture(scope="module")
def mixed_artifact(tmp_path_factory: pytest.TempPathFactory, source: Tensors) -> Path:
    """A published artifact: attention 8-bit sym, MLP 4-bit asym, SKIPPED in float, with a manifest."""
    out = tmp_path_factory.mktemp("ct") / "art"
    quantized = rtn_layers(source, mixed)
    handler = get_format(Format.COMPRESSED_TENSORS)
    build_artifact(
        out,
        lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions()),
        format=Format.COMPRESSED_TENSORS,
        recipe={"scheme": "mixed"},
    )
    return out


# --- round trips ------------------------------------------------------------------------------------

ROUND_TRIPS = [(2, 32, False), (2, 64, True), (3, 128, False), (3, -1, True), (4, 128, True), (4, -1, False),
               (8, 32, False), (8, -1, True)]  # fmt: skip


@pytest.mark.parametrize(("bits", "group_size", "sym"), ROUND_TRIPS)
def test_round_trip_is_exact_and_the_consumer_agrees(tmp_path: Path, bits: int, group_size: int, sym: bool) -> None:
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    names = [Q, "model.layers.1.self_attn.k_proj", "model.layers.2.mlp.down_proj"]
    quantized = random_layers(scheme, names)
    out = write(tmp_path / "art", quantized)
    ckpt = read_compressed_tensors(out)
    assert set(ckpt.quantized) == set(quantized)
    dense = ckpt.dense_state_dict(torch.float32)
    for name, qw in quantized.items():
        got = ckpt.quantized[name]
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.zeros, qw.zeros), name
        assert torch.equal(got.g_idx, qw.g_idx) and got.scheme == scheme, name
        assert torch.equal(got.scales, qw.scales.bfloat16().float()), name  # the demo's weights are bf16
        assert torch.equal(dense[f"{name}.weight"], expected_dense(qw)), name
    assert_consumer_agrees(out)


def test_rtn_round_trip_matches_the_fake_quantized_weights(tmp_path: Path, source: Tensors) -> None:
    quantized = rtn_layers(source, lambda name: W4_SYM)
    ckpt = read_compressed_tensors(write(tmp_path / "art", quantized))
    dense = ckpt.dense_state_dict(torch.float32)
    for name, qw in quantized.items():
        assert torch.equal(dense[f"{name}.weight"], expected_dense(qw)), name
        # bf16 scales move the weight by at most 2^-8 of its own size relative to our fp32 grid
        torch.testing.assert_close(dense[f"{name}.weight"], qw.dequantize(), rtol=2**-8, atol=0)


def test_packing_matches_compressed_tensors_bit_for_bit() -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    gen = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 8):
        for rows, length in ((5, 40), (3, 33), (16, 256), (2, 7)):
            values = torch.randint(0, 1 << bits, (rows, length), generator=gen)
            theirs = pack_to_int32((values - (1 << (bits - 1))).to(torch.int8), bits)
            assert torch.equal(pack_rows(values, bits), theirs), (bits, rows, length)
            assert torch.equal(unpack_rows(theirs, bits, length), values), (bits, rows, length)
            back = unpack_from_int32(pack_rows(values, bits), bits, torch.Size((rows, length)))
            assert torch.equal(back.long() + (1 << (bits - 1)), values), (bits, rows, length)


# --- the §8 checklist on a published mixed-precision artifact ----------------------------------------


def test_artifact_files_manifest_and_config(mixed_artifact: Path) -> None:
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig

    assert sorted(p.name for p in mixed_artifact.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    ]  # fmt: skip
    assert verify_manifest(mixed_artifact).format is Format.COMPRESSED_TENSORS
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (mixed_artifact / name).read_bytes() == (DEMO_MODEL / name).read_bytes()
    config = json.loads((mixed_artifact / "config.json").read_text())
    qcfg = config.pop("quantization_config")
    assert config == json.loads((DEMO_MODEL / "config.json").read_text())
    parsed = QuantizationConfig.model_validate(qcfg)  # extra keys in schemes/args are forbidden there
    assert qcfg["version"] == WRITTEN_VERSION == compressed_tensors.__version__  # bump both together
    assert (qcfg["quant_method"], qcfg["quantization_status"], qcfg["format"]) == (
        "compressed-tensors", "compressed", "pack-quantized",
    )  # fmt: skip
    assert qcfg["ignore"] == ["lm_head", SKIPPED]
    groups = qcfg["config_groups"]
    assert list(groups) == ["group_0", "group_1"]
    assert groups["group_0"]["targets"] == sorted(n for n in ALL_LINEARS if "mlp" in n and n != SKIPPED)
    assert groups["group_1"]["targets"] == ["Linear"]  # the 16 attention linears outnumber the 11 MLP ones
    assert all(g["format"] == "pack-quantized" for g in groups.values())
    w4, w8 = (parsed.config_groups[name].weights for name in groups)
    assert w8.num_bits == 8 and w8.symmetric and w8.group_size == 128 and w8.strategy == "group"
    assert w4.num_bits == 4 and not w4.symmetric and w4.group_size == 128


def test_every_module_resolves_to_its_scheme(mixed_artifact: Path) -> None:
    """Our matching and compressed-tensors' agree on every module, and give each linear its own grid."""
    from compressed_tensors.utils.match import match_targets

    ckpt = read_compressed_tensors(mixed_artifact)
    qcfg = qconfig(mixed_artifact)
    targets = {name: g["targets"] for name, g in qcfg["config_groups"].items()}
    target_to_group = {t: g for g, ts in targets.items() for t in ts}
    linear = torch.nn.Linear(1, 1, device="meta")
    assert set(ckpt.quantized) == set(ALL_LINEARS) - {SKIPPED}
    for name in [*ALL_LINEARS, "lm_head"]:
        ours = resolve_group(name, ("Linear", "Module"), targets, qcfg["ignore"])
        ignored = name in qcfg["ignore"]
        theirs = None if ignored else target_to_group[match_targets(name, linear, target_to_group)[0]]
        assert ours == theirs, name
        if ours is not None:
            bits = ckpt.parsed.groups[ours].bits
            assert bits == (8 if "self_attn" in name else 4), name
            assert ckpt.quantized[name].scheme.sym == (bits == 8), name


def test_tensors_dtypes_shapes_and_untouched_bytes(mixed_artifact: Path, source: Tensors) -> None:
    with safe_open(str(mixed_artifact / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        out = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    quantized = set(ALL_LINEARS) - {SKIPPED}
    untouched = set(source) - {f"{name}.weight" for name in quantized}
    for name in untouched:  # the skipped linear, norms, embeddings: byte-identical
        assert out[name].dtype == source[name].dtype, name
        assert torch.equal(out[name].view(torch.uint8), source[name].view(torch.uint8)), name
    expected: set[str] = set(untouched)
    for name in quantized:
        n, k = LOCAL_SHAPES[name.split(".", 3)[3]]
        bits, sym = (8, True) if "self_attn" in name else (4, False)
        assert (out[f"{name}.weight_packed"].dtype, tuple(out[f"{name}.weight_packed"].shape)) == (
            torch.int32, (n, k * bits // 32),
        )  # fmt: skip
        assert (out[f"{name}.weight_scale"].dtype, tuple(out[f"{name}.weight_scale"].shape)) == (
            torch.bfloat16, (n, k // 128),
        )  # fmt: skip
        assert out[f"{name}.weight_shape"].dtype == torch.int64
        assert out[f"{name}.weight_shape"].tolist() == [n, k]
        suffixes = ["weight_packed", "weight_scale", "weight_shape"]
        if not sym:
            zp = out[f"{name}.weight_zero_point"]
            assert (zp.dtype, tuple(zp.shape)) == (torch.int32, (n * bits // 32, k // 128))
            suffixes.append("weight_zero_point")
        expected |= {f"{name}.{s}" for s in suffixes}
    assert set(out) == expected  # no g_idx, no float weight of a quantized linear


def test_symmetric_codes_are_stored_with_the_offset(mixed_artifact: Path) -> None:
    """§8.3: sym codes live in [-2^(b-1), 2^(b-1)) and are stored + 2^(b-1); our unsigned codes as is."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    ckpt = read_compressed_tensors(mixed_artifact)
    raw = all_tensors(mixed_artifact)
    signed = unpack_from_int32(raw[f"{Q}.weight_packed"], 8, torch.Size((256, 256)))
    assert int(signed.min()) >= -128 and int(signed.max()) <= 127
    assert torch.equal(signed.long() + 128, ckpt.quantized[Q].codes.long())


def test_skipped_linear_stays_float(mixed_artifact: Path, source: Tensors) -> None:
    ckpt = read_compressed_tensors(mixed_artifact)
    assert SKIPPED not in ckpt.quantized and SKIPPED in qconfig(mixed_artifact)["ignore"]
    assert torch.equal(ckpt.tensors[f"{SKIPPED}.weight"], source[f"{SKIPPED}.weight"])
    assert torch.equal(ckpt.dense_state_dict(torch.bfloat16)[f"{SKIPPED}.weight"], source[f"{SKIPPED}.weight"])


def test_consumer_decompresses_the_mixed_artifact(mixed_artifact: Path) -> None:
    assert_consumer_agrees(mixed_artifact)


def test_dense_state_dict_rebuilds_the_demo_model(mixed_artifact: Path) -> None:
    from bitsmith.runtimes import artifact_format, load_reference

    assert artifact_format(mixed_artifact) is Format.COMPRESSED_TENSORS
    model = load_reference(mixed_artifact)  # strict load through the registry's reader
    state = model.state_dict()
    ckpt = read_compressed_tensors(mixed_artifact)
    assert torch.equal(state[f"{Q}.weight"], ckpt.dense_state_dict()[f"{Q}.weight"])


# --- transformers, the loader users run ---------------------------------------------------------------


def test_transformers_loads_a_symmetric_mixed_precision_artifact(tmp_path: Path, source: Tensors) -> None:
    """transformers + compressed-tensors: apply the config, load the packed tensors, decompress_model."""
    from transformers import AutoModelForCausalLM

    quantized = rtn_layers(source, lambda n: None if n == SKIPPED else W8_SYM if "self_attn" in n else W4_SYM)
    out = write(tmp_path / "art", quantized)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    quantizer: Any = model.hf_quantizer
    quantizer.compressor.decompress_model(model)
    state = model.state_dict()
    dense = read_compressed_tensors(out).dense_state_dict(torch.float32)
    for name in dense:
        assert torch.equal(state[name], dense[name]), name


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_transformers_dequantizes_an_asymmetric_artifact_on_load(tmp_path: Path, source: Tensors) -> None:
    """`dequantize=True` (one scheme: transformers applies the first group's to every layer)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out = write(tmp_path / "art", rtn_layers(source, lambda name: W4_ASYM))
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    state = model.state_dict()
    dense = read_compressed_tensors(out).dense_state_dict(torch.bfloat16)  # it dequantizes in the scale dtype
    for name in dense:
        assert torch.equal(state[name], dense[name].float()), name


# --- llm-compressor's own files ------------------------------------------------------------------------

LLMC_PRESETS = {
    "W4A16": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128, "strategy": "group"},
    "W4A16_ASYM": {"num_bits": 4, "type": "int", "symmetric": False, "group_size": 128, "strategy": "group"},
    "W8A16": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
}


def llmc_checkpoint(out: Path, source: Tensors, preset: str) -> Path:
    """A checkpoint as llm-compressor saves one, made by compressed-tensors itself: its observer math,
    its compressor, and config.json's block as `ModelCompressor.update_config` writes it."""
    import compressed_tensors
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(**LLMC_PRESETS[preset], observer="minmax")
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    tensors = {}
    for name, tensor in source.items():
        prefix = name.removesuffix(".weight")
        if prefix not in ALL_LINEARS:
            tensors[name] = tensor
            continue
        n, k = tensor.shape
        size = args.group_size if args.strategy == "group" else k
        grouped = tensor.float().reshape(n, k // size, size)
        scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        state = {"weight": tensor, "weight_scale": scale.to(tensor.dtype), "weight_zero_point": zero_point}
        compressed = PackedQuantizationCompressor.compress(state, scheme)
        tensors.update({f"{prefix}.{key}": value.contiguous() for key, value in compressed.items()})
    ct_config = QuantizationConfig(
        config_groups={"group_0": scheme}, ignore=["lm_head"], format="pack-quantized", quantization_status="compressed"
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


@pytest.mark.parametrize("preset", sorted(LLMC_PRESETS))
def test_reads_what_llm_compressor_writes(tmp_path: Path, source: Tensors, preset: str) -> None:
    out = llmc_checkpoint(tmp_path / "llmc", source, preset)
    ckpt = read_compressed_tensors(out)
    assert set(ckpt.quantized) == set(ALL_LINEARS)
    expected = LLMC_PRESETS[preset]
    scheme = ckpt.quantized[Q].scheme
    assert (scheme.bits, scheme.sym, scheme.group_size) == (
        expected["num_bits"], expected["symmetric"], expected.get("group_size", -1),
    )  # fmt: skip
    assert_consumer_agrees(out)
    # and the values are the consumer's own quantization of the demo weights (within its grid)
    dense = ckpt.dense_state_dict(torch.float32)
    step = ckpt.quantized[Q].scales.max()
    assert (dense[f"{Q}.weight"] - source[f"{Q}.weight"].float()).abs().max() <= step


def test_reads_old_llm_compressor_act_order_files(tmp_path: Path) -> None:
    """llm-compressor before compressed-tensors 0.19 wrote `actorder: "group"` and `weight_g_idx`."""
    quantized = random_layers(W4_SYM, [Q, "model.layers.1.mlp.gate_proj"], act_order=True)
    out = write(tmp_path / "art", quantized, variant="actorder-group")
    data = json.loads((out / "config.json").read_text())
    qcfg = data["quantization_config"]
    qcfg["version"] = "0.9.2"
    for group in qcfg["config_groups"].values():
        group["weights"].update(observer="minmax", observer_kwargs={}, actorder="group")
    (out / "config.json").write_text(json.dumps(data))
    ckpt = read_compressed_tensors(out)
    for name, qw in quantized.items():
        assert torch.equal(ckpt.quantized[name].g_idx, qw.g_idx), name
        assert torch.equal(ckpt.dense_state_dict()[f"{name}.weight"], expected_dense(qw)), name


def test_reads_the_pre_0_18_three_bit_layout(tmp_path: Path) -> None:
    """Up to compressed-tensors 0.17 a word held 10 whole 3-bit values; the version says which layout."""
    scheme = QuantScheme(bits=3, group_size=128, sym=False)
    quantized = random_layers(scheme, [Q])
    out = write(tmp_path / "art", quantized)
    qw = quantized[Q]

    def legacy_pack(values: torch.Tensor) -> torch.Tensor:  # written from FORMATS.md §3.3, Python ints
        rows = []
        for row in values.tolist():
            words = [sum(v << (3 * j) for j, v in enumerate(row[i : i + 10])) for i in range(0, len(row), 10)]
            rows.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
        return torch.tensor(rows, dtype=torch.int32)

    tensors = load_file(out / "model.safetensors")
    tensors[f"{Q}.weight_packed"] = legacy_pack(qw.codes.long())
    tensors[f"{Q}.weight_zero_point"] = legacy_pack(qw.zeros.long().t()).t().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FormatError, match=r"weight_packed .* expected I32 \[256, 24\]"):
        read_compressed_tensors(out)  # still declares 0.20.0: the dense layout is expected
    _edit_qcfg(out, version="0.12.2")
    got = read_compressed_tensors(out).quantized[Q]
    assert torch.equal(got.codes, qw.codes) and torch.equal(got.zeros, qw.zeros)


# --- act-order ---------------------------------------------------------------------------------------


def test_act_order_is_refused_by_default(tmp_path: Path) -> None:
    quantized = random_layers(W4_SYM, [Q, "model.layers.1.mlp.gate_proj"], act_order=True)
    with pytest.raises(UnsupportedError, match=r"q_proj.*act-order.*compressed-tensors >= 0.19.*static_groups"):
        write(tmp_path / "art", quantized)
    assert not any((tmp_path / "art").iterdir())


def test_static_groups_act_order_is_plain_contiguous_groups(tmp_path: Path, source: Tensors) -> None:
    quantized = rtn_layers(source, lambda name: W4_SYM)  # contiguous g_idx, as static_groups produces
    out = write(tmp_path / "art", quantized, options=GPTQOptions(act_order=True, static_groups=True))
    assert not any(name.endswith("weight_g_idx") for name in all_tensors(out))
    assert qconfig(out)["config_groups"]["group_0"]["weights"]["actorder"] is None


def test_actorder_group_variant_writes_g_idx_for_compressed_tensors_0_18(tmp_path: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    quantized = random_layers(W4_ASYM, [Q, "model.layers.1.mlp.gate_proj"], act_order=True)
    quantized.update(random_layers(W4_ASYM, ["model.layers.3.mlp.down_proj"]))  # contiguous: no g_idx
    out = write(tmp_path / "art", quantized, variant="actorder-group")
    qcfg = qconfig(out)
    assert qcfg["version"] == LEGACY_ACTORDER_VERSION
    groups = {tuple(g["targets"]): g["weights"]["actorder"] for g in qcfg["config_groups"].values()}
    assert groups == {("Linear",): "group", ("model.layers.3.mlp.down_proj",): None}
    raw = all_tensors(out)
    assert raw[f"{Q}.weight_g_idx"].dtype == torch.int32
    assert "model.layers.3.mlp.down_proj.weight_g_idx" not in raw
    ckpt = read_compressed_tensors(out)
    for name, qw in quantized.items():
        assert torch.equal(ckpt.quantized[name].g_idx, qw.g_idx), name
        assert torch.equal(ckpt.dense_state_dict()[f"{name}.weight"], expected_dense(qw)), name
    with pytest.raises(ValidationError, match="has been removed"):  # why it is not the default
        QuantizationConfig.model_validate(qcfg)


# --- dense replacements --------------------------------------------------------------------------------


def test_dense_replacements_are_written(tmp_path: Path, source: Tensors) -> None:
    quantized = rtn_layers(source, lambda name: W4_SYM)
    norm = "model.layers.0.input_layernorm.weight"
    dense = {norm: torch.linspace(0.5, 1.5, 256), "model.norm.weight": torch.full((256,), 0.75)}
    out = write(tmp_path / "art", quantized, dense=dense)
    ckpt = read_compressed_tensors(out)
    for name, value in dense.items():
        assert ckpt.tensors[name].dtype == torch.bfloat16, name  # the source's dtype
        assert torch.equal(ckpt.tensors[name], value.bfloat16()), name
    other = "model.layers.1.input_layernorm.weight"
    assert torch.equal(ckpt.tensors[other], source[other])


@pytest.mark.parametrize(
    ("dense", "match"),
    [
        ({"model.nope.weight": torch.zeros(3)}, "not in the source"),
        ({"model.norm.weight": torch.zeros(3)}, "shape"),
        ({f"{Q}.weight": torch.zeros(256, 256)}, "belongs to a quantized linear"),
        ({"model.norm.weight": torch.full((256,), float("nan"))}, "NaN"),
    ],
)
def test_bad_dense_replacements_are_refused(tmp_path: Path, dense: Tensors, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        write(tmp_path / "art", random_layers(W4_SYM, [Q]), dense=dense)
    assert not any((tmp_path / "art").iterdir())


# --- writer refusals -----------------------------------------------------------------------------------


def _set(name: str, field: str, index: tuple[int, int], value: float) -> Callable[[dict[str, QuantizedWeight]], None]:
    return lambda q: getattr(q[name], field).__setitem__(index, value)


REFUSALS = {
    "embedding is no linear": (lambda q: q.update({"model.embed_tokens": q.pop(Q)}), ConfigError, "not an nn.Linear"),
    "unknown layer": (lambda q: q.update({"model.layers.9.mlp.up_proj": q.pop(Q)}), ConfigError, "not an nn.Linear"),
    "wrong shape": (
        lambda q: q.update({"model.layers.0.self_attn.k_proj": q.pop(Q)}),
        ConfigError, r"source weight is \[128, 256\]",
    ),
    "code out of range": (_set(Q, "codes", (0, 0), 16), FormatError, r"q_proj.*codes span \[0, 16\]"),
    "sym zero moved": (_set(Q, "zeros", (0, 0), 7), FormatError, "symmetric zeros"),
    "scale NaN": (_set(Q, "scales", (0, 0), float("nan")), FormatError, "not finite"),
    "scale underflows bf16": (_set(Q, "scales", (0, 0), 1e-42), FormatError, "underflow to zero in torch.bfloat16"),
    "ragged groups": (
        lambda q: q.update({Q: QuantizedWeight(
            codes=q[Q].codes, scales=torch.ones(256, 3), zeros=torch.full((256, 3), 8, dtype=torch.int32),
            g_idx=(torch.arange(256) // 96).to(torch.int32), scheme=QuantScheme(bits=4, group_size=96, sym=True),
        )}),
        UnsupportedError, "group_size 96 does not divide in_features 256",
    ),
    "act-order": (lambda q: q.update(random_layers(W4_SYM, [Q], act_order=True)), UnsupportedError, "act-order"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_bad_layers_are_refused_before_writing(tmp_path: Path, case: str) -> None:
    mutate, error, match = REFUSALS[case]
    quantized = random_layers(W4_SYM, [Q, "model.layers.1.mlp.gate_proj"])
    mutate(quantized)
    with pytest.raises(error, match=match):
        write(tmp_path / "art", quantized)
    assert not any((tmp_path / "art").iterdir())


def test_writer_refuses_bad_calls(tmp_path: Path, mixed_artifact: Path) -> None:
    quantized = random_layers(W4_SYM, [Q])
    with pytest.raises(ConfigError, match="variant must be one of"):
        write(tmp_path / "a", quantized, variant="marlin")
    with pytest.raises(ConfigError, match="no quantized layers"):
        write(tmp_path / "b", {})
    with pytest.raises(UnsupportedError, match="already quantized"):
        write(tmp_path / "c", quantized, source_model_dir=mixed_artifact)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("x")
    with pytest.raises(AlreadyExistsError):
        write(tmp_path / "d", quantized)
    for name in "abc":
        assert not any((tmp_path / name).iterdir()), name


def test_sharded_output(tmp_path: Path, source: Tensors) -> None:
    quantized = rtn_layers(source, mixed)
    out = write(tmp_path / "art", quantized, max_shard_bytes=2**20)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    ckpt = read_compressed_tensors(out)
    assert all(torch.equal(ckpt.quantized[n].codes, qw.codes) for n, qw in quantized.items())


# --- hostile or inconsistent files ----------------------------------------------------------------------


def _rewrite_tensors(path: Path, change: Callable[[Tensors], object]) -> None:
    damage_tensors(change)(path)


def _swap(name: str, make: Callable[[Tensors], torch.Tensor]) -> Callable[[Path], None]:
    """Damage: set tensor `name` to `make(all tensors)`."""
    return lambda p: _rewrite_tensors(p, lambda t: t.update({name: make(t)}))


def _edit_config(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    data = json.loads((path / "config.json").read_text())
    change(data["quantization_config"])
    (path / "config.json").write_text(json.dumps(data))


def _edit_qcfg(path: Path, **fields: Any) -> None:
    _edit_config(path, lambda q: q.update(fields))


def _edit_group(path: Path, group: str, **fields: Any) -> None:
    _edit_config(path, lambda q: q["config_groups"][group].update(fields))


def _edit_weights(path: Path, **fields: Any) -> None:
    _edit_config(path, lambda q: [g["weights"].update(fields) for g in q["config_groups"].values()])


A = "model.layers.0.mlp.down_proj"  # asymmetric 4-bit in the mixed artifact
HOSTILE: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "truncated": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
        FormatError, "model.safetensors",
    ),
    "packed wrong shape": (
        _swap(f"{Q}.weight_packed", lambda t: t[f"{Q}.weight_packed"][:, :-1].clone()),
        FormatError, r"q_proj'.weight_packed .* expected I32 \[256, 64\]",
    ),
    "packed wrong dtype": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.weight_packed": t[f"{Q}.weight_packed"].long()})),
        FormatError, "weight_packed .* is I64",
    ),
    "scale float64": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"].double()})),
        FormatError, "weight_scale .* is F64",
    ),
    "scale infinite": (
        lambda p: _rewrite_tensors(p, lambda t: t[f"{Q}.weight_scale"].__setitem__((0, 0), float("inf"))),
        FormatError, "weight_scale is not finite",
    ),
    "missing zero point": (
        lambda p: _rewrite_tensors(p, lambda t: t.pop(f"{A}.weight_zero_point")), FormatError,
        "down_proj'.weight_zero_point is missing",
    ),
    "zero point on a symmetric layer": (
        _swap(f"{Q}.weight_zero_point", lambda t: t[f"{A}.weight_zero_point"].clone()),
        FormatError, "present but the group is symmetric",
    ),
    "weight_shape lies": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.weight_shape": torch.tensor([256, 255])})),
        FormatError, r"weight_shape is \[256, 255\]",
    ),
    "float weight left": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.weight": torch.zeros(2)})),
        FormatError, "float weight remains",
    ),
    "ignored module quantized": (
        _swap(f"{SKIPPED}.weight_packed", lambda t: t[f"{A}.weight_packed"].clone()),
        FormatError, "up_proj.weight_packed belongs to no module",
    ),
    "stray g_idx": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.weight_g_idx": torch.zeros(256, dtype=torch.int32)})),
        FormatError, "weight_g_idx present but",
    ),
    "no config.json": (lambda p: (p / "config.json").unlink(), FormatError, "no config.json"),
    "no quantization_config": (
        lambda p: (p / "config.json").write_text(json.dumps({"model_type": "llama"})), FormatError,
        "quantization_config is missing",
    ),
    "not compressed-tensors": (lambda p: _edit_qcfg(p, quant_method="gptq"), FormatError, "quant_method is 'gptq'"),
    "unknown top-level key": (lambda p: _edit_qcfg(p, packing="dense"), FormatError, r"unknown keys \['packing'\]"),
    "unknown weights key": (
        lambda p: _edit_weights(p, pack_order="lsb"), FormatError, r"unknown keys \['pack_order'\]",
    ),
    "bits as string": (lambda p: _edit_weights(p, num_bits="4"), FormatError, "num_bits must be an integer"),
    "five bits": (lambda p: _edit_weights(p, num_bits=5), UnsupportedError, "5-bit weights"),
    "float weights": (lambda p: _edit_weights(p, type="float"), UnsupportedError, "float weights"),
    "tensor strategy": (
        lambda p: _edit_weights(p, strategy="tensor", group_size=None), UnsupportedError, "strategy 'tensor'",
    ),
    "group without size": (lambda p: _edit_weights(p, group_size=None), FormatError, "needs a positive group_size"),
    "dynamic weights": (lambda p: _edit_weights(p, dynamic=True), UnsupportedError, "dynamic weight"),
    "bad actorder": (lambda p: _edit_weights(p, actorder="sideways"), FormatError, "unknown actorder"),
    "activations quantized": (
        lambda p: _edit_group(p, "group_0", input_activations={"num_bits": 8, "type": "int", "strategy": "token",
                                                               "dynamic": True}),
        UnsupportedError, "input_activations are quantized",
    ),
    "naive format": (
        lambda p: _edit_group(p, "group_0", format="naive-quantized"), UnsupportedError, "naive-quantized",
    ),
    "unknown format": (lambda p: _edit_group(p, "group_0", format="zip"), FormatError, "unknown format 'zip'"),
    "format not a string": (lambda p: _edit_qcfg(p, format=["pack-quantized"]), FormatError, "unknown format"),
    "status not a string": (lambda p: _edit_qcfg(p, quantization_status={}), FormatError, "quantization_status"),
    "ignore not a list": (lambda p: _edit_qcfg(p, ignore="lm_head"), FormatError, "ignore must be a list"),
    "declared scale_dtype differs": (
        lambda p: _edit_weights(p, scale_dtype="torch.float16"),
        FormatError, r"weight_scale .* is BF16 .* expected F16",
    ),
    "scale_dtype odd": (lambda p: _edit_weights(p, scale_dtype=["bf16"]), UnsupportedError, "scale_dtype"),
    "preset reference": (
        lambda p: _edit_config(p, lambda q: q["config_groups"].update({"W4A16": ["Linear"]})),
        UnsupportedError, "preset",
    ),
    "kv cache": (
        lambda p: _edit_qcfg(p, kv_cache_scheme={"num_bits": 8, "type": "float"}), UnsupportedError, "kv_cache",
    ),
    "transform": (
        lambda p: _edit_qcfg(p, transform_config={"config_groups": {"u": {}}}), UnsupportedError, "transform_config",
    ),
    "frozen status": (lambda p: _edit_qcfg(p, quantization_status="frozen"), UnsupportedError, "'frozen'"),
    "odd status": (lambda p: _edit_qcfg(p, quantization_status="baked"), FormatError, "unknown quantization_status"),
    "bad version": (lambda p: _edit_qcfg(p, version="latest"), FormatError, "not a compressed-tensors version"),
    "bad regex": (
        lambda p: _edit_group(p, "group_0", targets=["re:model.(layers"]), FormatError, "not a valid regex",
    ),
    "targets not a list": (lambda p: _edit_group(p, "group_1", targets="Linear"), FormatError, "targets must be"),
    "ignore dropped": (  # lm_head is tied, so it has no tensors: the Linear target wants them
        lambda p: _edit_qcfg(p, ignore=[SKIPPED]), FormatError, r"module 'lm_head'.weight_packed is missing",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_inconsistent_files_are_refused(mixed_artifact: Path, tmp_path: Path, case: str) -> None:
    damage, error, match = HOSTILE[case]
    assert_reader_refuses(mixed_artifact, tmp_path, damage, read_compressed_tensors, error, match)


def test_version_is_only_needed_for_widths_that_straddle_words(tmp_path: Path) -> None:
    out = write(tmp_path / "w4", random_layers(W4_SYM, [Q]))
    _edit_config(out, lambda q: q.pop("version"))
    assert read_compressed_tensors(out).parsed.version is None
    out = write(tmp_path / "w3", random_layers(QuantScheme(bits=3, group_size=128, sym=True), [Q]))
    _edit_config(out, lambda q: q.pop("version"))
    with pytest.raises(FormatError, match=r"no version, so the packing of \[3\]-bit"):
        read_compressed_tensors(out)


def test_matching_follows_compressed_tensors_preferences() -> None:
    """Exact name > regex > class; regexes match at the start only; ignore wins; later groups win a target."""
    lin = ("Linear", "Module")
    groups = {"g0": ["Linear"], "g1": ["re:.*proj"], "g2": ["model.layers.0.mlp.up_proj"]}
    assert resolve_group("model.layers.0.mlp.up_proj", lin, groups, []) == "g2"
    assert resolve_group("model.layers.0.mlp.down_proj", lin, groups, []) == "g1"
    assert resolve_group("lm_head", lin, groups, []) == "g0"
    assert resolve_group("lm_head", lin, groups, ["re:lm_"]) is None
    assert resolve_group("model.norm", ("LlamaRMSNorm", "Module"), {"g": ["re:norm"]}, []) is None  # re.match
    assert resolve_group("x", lin, {"a": ["Linear"], "b": ["Linear"]}, []) == "b"
    assert resolve_group("x", lin, {"a": ["re:x", "re:.*"]}, ["Embedding"]) == "a"

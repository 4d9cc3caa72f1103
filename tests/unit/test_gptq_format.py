"""GPTQ format: exact write→read round trips on the demo model, an independent unpacker written from
FORMATS.md §1.4-1.5, the §8 config checks, input validation, and hostile files."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from bitsmith.demo import DEMO_MODEL
from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError, UnsupportedError
from bitsmith.formats import get_format, known_formats
from bitsmith.formats.gptq import read_gptq, write_gptq
from bitsmith.manifest import build_artifact, verify_manifest
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import Format, GPTQOptions, QuantScheme
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# (out N, in K) of the demo linears we quantize in most tests: square, narrow N, wide K.
LAYERS = {
    "model.layers.0.self_attn.q_proj": (256, 256),
    "model.layers.1.self_attn.k_proj": (128, 256),
    "model.layers.2.mlp.down_proj": (256, 768),
}


def random_qw(n: int, k: int, scheme: QuantScheme, *, act_order: bool, seed: int) -> QuantizedWeight:
    """Random codes/zeros/scales; with act_order a random column permutation drives g_idx."""
    gen = torch.Generator().manual_seed(seed)
    size = scheme.effective_group_size(k)
    groups = scheme.groups(k)
    g_idx = torch.arange(k) // size
    if act_order:
        g_idx = g_idx[torch.argsort(torch.randperm(k, generator=gen))]
    if scheme.sym:
        zeros = torch.full((n, groups), 1 << (scheme.bits - 1))
    else:
        zeros = torch.randint(scheme.min_zero, scheme.maxq + 1, (n, groups), generator=gen)
    return QuantizedWeight(
        codes=torch.randint(0, scheme.maxq + 1, (n, k), generator=gen).to(torch.uint8),
        scales=torch.rand(n, groups, generator=gen) * 0.05 + 1e-3,
        zeros=zeros.to(torch.int32),
        g_idx=g_idx.to(torch.int32),
        scheme=scheme,
    )


def random_layers(scheme: QuantScheme, *, act_order: bool = False) -> dict[str, QuantizedWeight]:
    return {
        name: random_qw(n, k, scheme, act_order=act_order, seed=i)
        for i, (name, (n, k)) in enumerate(LAYERS.items())
    }


def write(out: Path, quantized: dict[str, QuantizedWeight], **kwargs) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    options = kwargs.pop("options", GPTQOptions())
    return write_gptq(out, source_model_dir=DEMO_MODEL, quantized=quantized, options=options, **kwargs)


# --- an independent unpacker, written from FORMATS.md §1.4-1.5 with Python ints -------------------


def spec_unpack_column(words: list[int], bits: int) -> list[int]:
    """Values packed in one column of int32 words, following the spec's words literally."""
    words = [w & 0xFFFFFFFF for w in words]
    mask = (1 << bits) - 1
    if bits != 3:  # field j of word r holds value r*pf + j, LSB first
        return [(w >> (j * bits)) & mask for w in words for j in range(32 // bits)]
    values: list[int] = []
    for a, b, c in zip(words[0::3], words[1::3], words[2::3], strict=True):
        values += [(a >> (3 * i)) & 7 for i in range(10)]  # inputs 0..9
        values.append(((a >> 30) & 3) | ((b & 1) << 2))  # input 10: 2 bits in A, 1 in B
        values += [(b >> (1 + 3 * i)) & 7 for i in range(10)]  # inputs 11..20
        values.append(((b >> 31) & 1) | ((c & 3) << 1))  # input 21: 1 bit in B, 2 in C
        values += [(c >> (2 + 3 * i)) & 7 for i in range(10)]  # inputs 22..31
    return values


def spec_codes(qweight: torch.Tensor, bits: int) -> np.ndarray:
    """[N, K] codes from qweight [K*b/32, N] (packed along the input dim)."""
    cols = qweight.numpy().T.tolist()
    return np.array([spec_unpack_column(col, bits) for col in cols])


def spec_zeros(qzeros: torch.Tensor, bits: int, *, v1: bool) -> np.ndarray:
    """[N, G] true zeros from qzeros [G, N*b/32] (packed along the output dim; v1 stores zero-1)."""
    rows = [spec_unpack_column(row, bits) for row in qzeros.numpy().tolist()]
    return np.array(rows).T + (1 if v1 else 0)


# --- round trips ----------------------------------------------------------------------------------

ROUND_TRIPS = [
    # bits, group_size, sym, act_order, checkpoint_format
    (2, 32, False, False, "gptq_v2"),
    (2, 64, True, True, "gptq"),
    (3, 128, False, True, "gptq_v2"),
    (3, 32, True, False, "gptq"),
    (3, -1, False, False, "gptq"),
    (4, 128, True, False, "gptq"),
    (4, 64, False, True, "gptq"),
    (4, -1, True, False, "gptq_v2"),
    (8, 32, False, False, "gptq"),
    (8, 128, True, True, "gptq"),
]


@pytest.mark.parametrize(("bits", "group_size", "sym", "act_order", "fmt"), ROUND_TRIPS)
def test_write_read_round_trip_is_exact(
    tmp_path: Path, bits: int, group_size: int, sym: bool, act_order: bool, fmt: str
) -> None:
    min_zero = 1 if fmt == "gptq" and not sym else 0
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym, min_zero=min_zero)
    quantized = random_layers(scheme, act_order=act_order)
    out = write(tmp_path / "art", quantized, variant=fmt, options=GPTQOptions(act_order=act_order, static_groups=False))
    ckpt = read_gptq(out)
    assert ckpt.scheme.bits == bits and ckpt.scheme.group_size == group_size and ckpt.scheme.sym == sym
    assert ckpt.desc_act == act_order and ckpt.checkpoint_format == fmt
    assert set(ckpt.quantized) == set(quantized)
    raw = load_file(out / "model.safetensors")
    for name, qw in quantized.items():
        got = ckpt.quantized[name]
        assert torch.equal(got.codes, qw.codes), name
        assert torch.equal(got.zeros, qw.zeros), name
        assert torch.equal(got.g_idx, qw.g_idx), name
        assert torch.equal(got.scales, qw.scales.half().float()), name
        # the independent unpacker agrees with what we meant to write
        assert np.array_equal(spec_codes(raw[f"{name}.qweight"], bits), qw.codes.numpy()), name
        v1 = fmt == "gptq"
        assert np.array_equal(spec_zeros(raw[f"{name}.qzeros"], bits, v1=v1), qw.zeros.numpy()), name
        # §8.4: dequant from the file equals the fake-quantized weight with fp16 scales
        expected = (qw.codes.float() - qw.zeros.float()[:, qw.g_idx.long()]) * qw.scales.half().float()[
            :, qw.g_idx.long()
        ]
        assert torch.equal(ckpt.dense_state_dict()[f"{name}.weight"], expected), name


def test_spec_unpacker_reads_a_hand_packed_three_bit_word_triple() -> None:
    """Input 10 = 0b101 and input 21 = 0b011 straddle words; every other input is 0."""
    a = 0b01 << 30  # low 2 bits of input 10
    b = 0b1 | (0b1 << 31)  # bit 2 of input 10, bit 0 of input 21
    c = 0b01  # bits 1-2 of input 21
    values = spec_unpack_column([a, b, c], 3)
    assert values[10] == 0b101 and values[21] == 0b011
    assert sum(values) == 0b101 + 0b011
    codes = torch.zeros(256, 32, dtype=torch.uint8)
    codes[:, 10], codes[:, 21] = 0b101, 0b011
    from bitsmith.formats.gptq.packing import pack_dim0

    words = pack_dim0(codes.t(), 3)[:3, 0].tolist()
    assert [w & 0xFFFFFFFF for w in words] == [a, b, c]


@pytest.mark.parametrize(("bits", "word"), [(4, 0x77777777), (8, 0x7F7F7F7F), (2, 0x55555555)])
def test_symmetric_v1_qzeros_words(tmp_path: Path, bits: int, word: int) -> None:
    out = write(tmp_path / "art", random_layers(QuantScheme(bits=bits, group_size=128, sym=True)))
    raw = load_file(out / "model.safetensors")
    for name in LAYERS:
        words = raw[f"{name}.qzeros"].numpy().view(np.uint32)
        assert (words == word).all(), name


# --- §8 checklist on a written artifact -----------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published 4-bit asym v1 artifact (min_zero=1) with a manifest, shared by read-only tests."""
    out = tmp_path_factory.mktemp("gptq") / "art"
    quantized = random_layers(QuantScheme(bits=4, group_size=128, sym=False, min_zero=1))
    handler = get_format(Format.GPTQ)
    build_artifact(
        out,
        lambda d: handler.write(d, source_model_dir=DEMO_MODEL, quantized=quantized, options=GPTQOptions()),
        format=Format.GPTQ,
        recipe={"scheme": "4bit"},
    )
    return out


def test_artifact_files_and_manifest(artifact: Path) -> None:
    names = sorted(p.name for p in artifact.iterdir())
    assert names == [
        "config.json",
        "generation_config.json",
        "manifest.json",
        "model.safetensors",
        "quantize_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert verify_manifest(artifact).format is Format.GPTQ
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (artifact / name).read_bytes() == (DEMO_MODEL / name).read_bytes()


def test_configs_are_equal_and_complete(artifact: Path) -> None:
    config = json.loads((artifact / "config.json").read_text())
    qcfg = json.loads((artifact / "quantize_config.json").read_text())
    assert config["quantization_config"] == qcfg
    assert {k: qcfg[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "desc_act": False,
        "sym": False,
    }
    assert qcfg["format"] == qcfg["checkpoint_format"] == "gptq"
    assert qcfg["pack_dtype"] == "int32" and qcfg["lm_head"] is False
    assert qcfg["meta"]["quantizer"][0].startswith("bitsmith:")
    source = json.loads((DEMO_MODEL / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source


def test_tensors_dtypes_shapes_and_untouched_bytes(artifact: Path) -> None:
    with safe_open(str(artifact / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        out = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    source = load_file(DEMO_MODEL / "model.safetensors")
    quantized_weights = {f"{name}.weight" for name in LAYERS}
    untouched = set(source) - quantized_weights
    assert not quantized_weights & set(out)
    for name in untouched:
        assert out[name].dtype == source[name].dtype, name
        assert torch.equal(out[name].view(torch.uint8), source[name].view(torch.uint8)), name
    for name, (n, k) in LAYERS.items():
        assert (out[f"{name}.qweight"].dtype, tuple(out[f"{name}.qweight"].shape)) == (
            torch.int32,
            (k // 8, n),
        )
        assert (out[f"{name}.qzeros"].dtype, tuple(out[f"{name}.qzeros"].shape)) == (
            torch.int32,
            (k // 128, n // 8),
        )
        assert (out[f"{name}.scales"].dtype, tuple(out[f"{name}.scales"].shape)) == (
            torch.float16,
            (k // 128, n),
        )
        assert torch.equal(out[f"{name}.g_idx"], torch.arange(k, dtype=torch.int32) // 128)
    assert set(out) == untouched | {
        f"{n}.{s}" for n in LAYERS for s in ("qweight", "qzeros", "scales", "g_idx")
    }


def test_v1_asymmetric_zeros_are_never_zero(artifact: Path) -> None:
    ckpt = read_gptq(artifact)
    assert ckpt.scheme.min_zero == 1
    assert all(int(qw.zeros.min()) >= 1 for qw in ckpt.quantized.values())


def test_dense_state_dict_rebuilds_the_demo_model(artifact: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = read_gptq(artifact)
    state = ckpt.dense_state_dict(torch.float32)
    source = load_file(DEMO_MODEL / "model.safetensors")
    assert set(state) == set(source)
    assert all(t.dtype == torch.float32 for t in state.values())
    fields = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}


def test_sharded_source_and_sharded_output(tmp_path: Path) -> None:
    source = load_file(DEMO_MODEL / "model.safetensors")
    sharded = tmp_path / "sharded-src"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(DEMO_MODEL / name, sharded / name)
    names = sorted(source)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: source[n] for n in part}, str(sharded / file), metadata={"format": "pt"})
    weight_map = {n: file for file, part in halves.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    quantized = random_layers(QuantScheme(bits=4, group_size=128, sym=True))
    out = tmp_path / "out"
    out.mkdir()
    write_gptq(
        out, source_model_dir=sharded, quantized=quantized, options=GPTQOptions(), max_shard_bytes=2**21
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(out / s).values()
    )
    ckpt = read_gptq(out)
    assert all(torch.equal(ckpt.quantized[n].codes, qw.codes) for n, qw in quantized.items())
    assert torch.equal(ckpt.tensors["model.norm.weight"], source["model.norm.weight"])


# --- writer input validation ----------------------------------------------------------------------


def test_v1_refuses_asymmetric_zero_of_zero_naming_the_layer(tmp_path: Path) -> None:
    quantized = random_layers(QuantScheme(bits=4, group_size=128, sym=False, min_zero=1))
    qw = quantized["model.layers.1.self_attn.k_proj"]
    qw.zeros[3, 0] = 0
    with pytest.raises(FormatError, match=r"k_proj.*min_zero=1"):
        write(tmp_path / "art", quantized)
    assert not any((tmp_path / "art").iterdir())
    write(tmp_path / "v2", quantized, variant="gptq_v2")  # v2 stores true zeros: fine


def test_mixed_precision_and_float_linears_go_to_dynamic(tmp_path: Path) -> None:
    """The most common scheme is global; an 8-bit q/k/v and a 3-bit down_proj are `dynamic` overrides (with
    vLLM's fused name where a whole fused set shares one), and a linear left out stays float behind "-:"."""
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256), "self_attn.v_proj": (128, 256),
              "self_attn.o_proj": (256, 256), "mlp.gate_proj": (768, 256), "mlp.up_proj": (768, 256),
              "mlp.down_proj": (256, 768)}
    four, eight = QuantScheme(bits=4, group_size=128, sym=True), QuantScheme(bits=8, group_size=128, sym=True)
    quantized = {
        f"model.layers.{b}.{local}": random_qw(n, k, eight if b == 1 and "attn" in local and "o_" not in local
                                               else four, act_order=False, seed=b)
        for b in range(4) for local, (n, k) in shapes.items()
    }
    quantized["model.layers.2.mlp.down_proj"] = random_qw(
        256, 768, QuantScheme(bits=3, group_size=64, sym=False), act_order=False, seed=9
    )
    del quantized["model.layers.3.mlp.up_proj"]
    write(tmp_path / "art", quantized, variant="gptq_v2")
    qcfg = json.loads((tmp_path / "art" / "quantize_config.json").read_text())
    assert (qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == (4, 128, True)
    assert qcfg["dynamic"] == {
        r"-:model\.layers\.3\.mlp\.(?:up_proj)$": {},
        r"+:model\.layers\.2\.mlp\.(?:down_proj)$": {"bits": 3, "group_size": 64, "sym": False},
        r"+:model\.layers\.1\.self_attn\.(?:k_proj|q_proj|qkv_proj|v_proj)$": {
            "bits": 8, "group_size": 128, "sym": True},
    }
    ckpt = read_gptq(tmp_path / "art")
    assert set(ckpt.quantized) == set(quantized)
    for name, qw in quantized.items():
        got = ckpt.quantized[name]
        assert got.scheme == qw.scheme and torch.equal(got.codes, qw.codes) and torch.equal(got.zeros, qw.zeros)
    source = load_file(str(DEMO_MODEL / "model.safetensors"))
    up = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(ckpt.tensors[up], source[up])


def test_dynamic_that_contradicts_the_tensors_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "art", random_layers(QuantScheme(bits=4, group_size=128, sym=True)))
    for dynamic, reason in [({"-:.*q_proj$": {}}, "dynamic says it is not quantized"),
                            ({"+:.*q_proj$": {"bits": 8}}, r"q_proj.*qweight.*expected"),
                            ({"+:(": {}}, "not a valid regex"),
                            ({"+:.*q_proj$": {"bits": "8"}}, "sets bits to '8'")]:
        for name in ("config.json", "quantize_config.json"):
            path = tmp_path / "art" / name
            data = json.loads(path.read_text())
            (data["quantization_config"] if name == "config.json" else data)["dynamic"] = dynamic
            path.write_text(json.dumps(data))
        with pytest.raises(FormatError, match=reason):
            read_gptq(tmp_path / "art")


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (
            lambda q: q.update({"model.embed_tokens": q.pop("model.layers.0.self_attn.q_proj")}),
            ConfigError,
            "not an nn.Linear",
        ),
        (
            lambda q: q.update({"model.layers.9.mlp.up_proj": q.pop("model.layers.0.self_attn.q_proj")}),
            ConfigError,
            "not an nn.Linear",
        ),
        (
            lambda q: q.update({"model.layers.0.self_attn.o_proj": q.pop("model.layers.1.self_attn.k_proj")}),
            ConfigError,
            r"source weight is \[256, 256\]",
        ),
        (
            lambda q: q["model.layers.0.self_attn.q_proj"].codes.__setitem__((0, 0), 16),
            FormatError,
            r"q_proj.*codes span \[0, 16\]",
        ),
        (
            lambda q: q["model.layers.0.self_attn.q_proj"].zeros.__setitem__((0, 0), 7),
            FormatError,
            "symmetric zeros",
        ),
        (
            lambda q: q["model.layers.0.self_attn.q_proj"].scales.__setitem__((0, 0), 1e6),
            FormatError,
            "not finite in float16",
        ),
        (
            lambda q: q["model.layers.0.self_attn.q_proj"].g_idx.copy_(
                q["model.layers.0.self_attn.q_proj"].g_idx.flip(0)
            ),
            FormatError,
            "without act-order",
        ),
    ],
)
def test_bad_layers_are_refused_before_writing(tmp_path: Path, mutate, error: type, match: str) -> None:
    quantized = random_layers(QuantScheme(bits=4, group_size=128, sym=True))
    mutate(quantized)
    with pytest.raises(error, match=match):
        write(tmp_path / "art", quantized)
    assert not any((tmp_path / "art").iterdir())


def test_writer_refuses_a_non_empty_out_dir_and_bad_format(tmp_path: Path) -> None:
    quantized = random_layers(QuantScheme(bits=4, group_size=128, sym=True))
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "old").write_text("x")
    with pytest.raises(AlreadyExistsError):
        write(tmp_path / "art", quantized)
    with pytest.raises(ConfigError, match="checkpoint_format must be one of gptq, gptq_v2"):
        write(tmp_path / "new", quantized, variant="exl2")


def test_registry_covers_every_format() -> None:
    assert set(known_formats()) == set(Format)
    assert get_format(Format.GPTQ).read is read_gptq
    with pytest.raises(UnsupportedError, match=r"known formats: .*gptq"):
        get_format("exl2")  # type: ignore[arg-type]


# --- hostile or inconsistent files ----------------------------------------------------------------


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def _rewrite_tensors(path: Path, change) -> None:
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _edit_qcfg(path: Path, **fields) -> None:
    for name in ("config.json", "quantize_config.json"):
        data = json.loads((path / name).read_text())
        target = data["quantization_config"] if name == "config.json" else data
        target.update(fields)
        (path / name).write_text(json.dumps(data))


Q = "model.layers.0.self_attn.q_proj"
HOSTILE = {
    "truncated": (
        lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:5000]),
        "model.safetensors",
    ),
    "huge header length": (
        lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}"),
        "header claims",
    ),
    "tiny file": (lambda p: (p / "model.safetensors").write_bytes(b"\x01\x02"), "too short"),
    "header not json": (
        lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff{[}"),
        "not valid JSON",
    ),
    "huge shape": (
        lambda p: (p / "model.safetensors").write_bytes(
            _header_only({"x": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}})
            + b"\0" * 16
        ),
        "needs",
    ),
    "offsets past the end": (
        lambda p: (p / "model.safetensors").write_bytes(
            _header_only({"x": {"dtype": "U8", "shape": [1 << 20], "data_offsets": [0, 1 << 20]}})
            + b"\0" * 16
        ),
        "outside the 16-byte data section",
    ),
    "qweight wrong dtype": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].long()})),
        r"qweight \(model.safetensors\) is I64",
    ),
    "qweight wrong shape": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:-1]})),
        r"qweight .* expected I32 \[32, 256\]",
    ),
    "scales fp32": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"].float()})),
        "expected F16",
    ),
    "g_idx out of range": (
        lambda p: _rewrite_tensors(p, lambda t: t[f"{Q}.g_idx"].__setitem__(0, 5)),
        "g_idx values outside",
    ),
    "missing qzeros": (lambda p: _rewrite_tensors(p, lambda t: t.pop(f"{Q}.qzeros")), "qzeros is missing"),
    "float weight left": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({f"{Q}.weight": torch.zeros(2)})),
        "float weight remains",
    ),
    "stray scales": (
        lambda p: _rewrite_tensors(p, lambda t: t.update({"model.x.scales": torch.zeros(2).half()})),
        "model.x.scales has no matching qweight",
    ),
    "no quantize config": (
        lambda p: _drop_qcfg(p, standalone_too=True),
        "no quantization config",
    ),
    "configs disagree": (
        lambda p: (p / "quantize_config.json").write_text(
            json.dumps({**json.loads((p / "quantize_config.json").read_text()), "group_size": 64})
        ),
        "disagree on",
    ),
    "bits 5": (lambda p: _edit_qcfg(p, bits=5), "bits must be one of"),
    "bits as string": (lambda p: _edit_qcfg(p, bits="4"), "bits must be one of"),
    "sym claimed": (lambda p: _edit_qcfg(p, sym=True), "sym is true but zeros"),
    "unknown format": (
        lambda p: _edit_qcfg(p, format="gptq_v9", checkpoint_format="gptq_v9"),
        "unsupported checkpoint format",
    ),
    "formats disagree": (lambda p: _edit_qcfg(p, format="gptq_v2"), "format and checkpoint_format disagree"),
    "not gptq": (lambda p: _edit_qcfg(p, quant_method="awq"), "quant_method is 'awq'"),
    "no config.json": (lambda p: (p / "config.json").unlink(), "no config.json"),
}


def _header_only(header: dict) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def _drop_qcfg(path: Path, *, standalone_too: bool = False) -> None:
    data = json.loads((path / "config.json").read_text())
    del data["quantization_config"]
    (path / "config.json").write_text(json.dumps(data))
    if standalone_too:
        (path / "quantize_config.json").unlink()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_or_inconsistent_files_raise_format_error(artifact: Path, tmp_path: Path, case: str) -> None:
    damage, match = HOSTILE[case]
    path = _copy(artifact, tmp_path)
    damage(path)
    with pytest.raises(FormatError, match=match):
        read_gptq(path)


def test_only_quantize_config_json_is_enough(artifact: Path, tmp_path: Path) -> None:
    path = _copy(artifact, tmp_path)
    _drop_qcfg(path)
    assert read_gptq(path).scheme == read_gptq(artifact).scheme


def test_linears_solved_together_may_share_g_idx(tmp_path: Path) -> None:
    """q/k/v solved as one problem come back sharing one g_idx tensor; the writer must still save them."""
    from bitsmith.demo import CALIB_FILES
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.recipes import Recipe
    from bitsmith.schemes import Method

    quantized = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=2, seq_len=32,
                                    recipe=Recipe(scheme=QuantScheme(bits=4, group_size=128), method=Method.RTN),
                                    ).quantized
    write(tmp_path / "art", quantized, variant="gptq_v2")
    assert set(read_gptq(tmp_path / "art").quantized) == set(quantized)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("layout", ["transposed", "contiguous", "int64"])
def test_byte_packing_writes_the_words_of_the_bit_stream(bits: int, layout: str) -> None:
    """The byte-at-a-time packing of widths that divide 8 is the same words as the bit-stream packing,
    whatever the layout and dtype the caller hands over."""
    from bitsmith.formats.gptq.packing import _pack_bytes, _pack_stream, pack_dim0, unpack_dim0

    codes = torch.randint(0, 1 << bits, (48, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    values = {"transposed": codes.t(), "contiguous": codes.t().contiguous(), "int64": codes.t().to(torch.int64)}[layout]
    fast = _pack_bytes(values, bits)
    assert fast.dtype == torch.int32 and fast.is_contiguous()
    assert torch.equal(fast, _pack_stream(values, bits))
    assert torch.equal(pack_dim0(values, bits), fast)
    assert torch.equal(unpack_dim0(fast, bits), values.to(torch.int64))


def test_listing_the_linears_never_switches_the_process_default_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo config says bfloat16; building its skeleton must not make that torch's default even for a
    moment, because packers of concurrent jobs share the process (a leak turned later float32 tensors into
    bfloat16)."""
    from bitsmith.formats.gptq.writer import linear_names

    seen: list[torch.dtype] = []
    original = torch.set_default_dtype

    def recording(dtype: torch.dtype) -> None:
        seen.append(dtype)
        original(dtype)

    monkeypatch.setattr(torch, "set_default_dtype", recording)
    names = linear_names(DEMO_MODEL)
    assert "model.layers.0.self_attn.q_proj" in names and "lm_head" in names
    assert torch.get_default_dtype() == torch.float32
    assert set(seen) <= {torch.float32}

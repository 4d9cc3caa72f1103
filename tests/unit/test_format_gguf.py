"""GGUF format: llama-quantize's mixes (checked against llama.cpp's own quantizer), metadata and tokenizer
keys, exact write→read of every ggml type against gguf-py's dequantizers, the byte-level validator on hostile
files, every refusal of the writer, atomic publishing, and llama.cpp itself loading our files: its tokens
equal the HF tokenizer's and its logits equal transformers' (a wrong q/k permutation would not)."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from bitsmith.demo import DEMO_MODEL, EVAL_FILES
from bitsmith.errors import AlreadyExistsError, ConfigError, FormatError, NotFoundError, UnsupportedError
from bitsmith.formats import get_format
from bitsmith.formats.base import staging_dirs
from bitsmith.formats.gguf import MIXES, get_mix, linear_types, mix_names, read, validate
from bitsmith.formats.gguf.mixes import ModelFacts, tensor_types
from bitsmith.formats.gguf.names import TensorPlan, rope_rows
from bitsmith.formats.gguf.tokenizer import IGNORE_MERGES, SPLIT_PRE, read_vocab
from bitsmith.formats.gguf.writer import write_gguf
from bitsmith.manifest import verify_manifest
from bitsmith.quantized import GGMLWeight, QuantizedWeight
from bitsmith.schemes import Format, GGMLScheme, GGMLType, QuantScheme
from safetensors.torch import load_file

from .gguf_files import (
    ARRAY,
    STRING,
    UINT32,
    byte_level_bpe,
    f32_tensor,
    file_types,
    gguf_string,
    kv,
    llama_cpp_run,
    llama_quantize,
    random_blocks,
    raw_gguf,
    sentencepiece_model,
    small_tokenizer,
    solve_rtn,
    tensor_info,
    tiny_model,
    write_artifact,
)

SOURCE = load_file(DEMO_MODEL / "model.safetensors")
TOKENIZER = json.loads((DEMO_MODEL / "tokenizer.json").read_text())
LINEARS = sorted(name.removesuffix(".weight") for name in SOURCE if name.endswith("proj.weight"))
T = GGMLType


@pytest.fixture(scope="module")
def f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model as a published F16 artifact (the converter's default); returns the .gguf file."""
    return write_artifact(tmp_path_factory.mktemp("gguf") / "f16")


def eval_text(chars: int) -> str:
    return EVAL_FILES[0].read_text(encoding="utf-8")[:chars] + EVAL_FILES[1].read_text(encoding="utf-8")[:chars]


def zero_blocks(ggml_type: GGMLType, n: int, k: int) -> GGMLWeight:
    """All-zero blocks of a type: a valid `GGMLWeight` for the writer's checks, no solve needed."""
    return GGMLWeight(data=torch.zeros(n, ggml_type.row_bytes(k), dtype=torch.uint8),
                      scheme=GGMLScheme(type=ggml_type), in_features=k)


def solves_of(mix: str, make: Callable[[GGMLType, int, int, int], GGMLWeight],
              source: Path = DEMO_MODEL) -> dict[str, GGMLWeight]:
    """A `GGMLWeight` from `make(type, n, k, index)` for every linear `mix` quantizes."""
    weights = load_file(source / "model.safetensors")
    solves = {}
    for i, (name, ggml_type) in enumerate(linear_types(mix, source).items()):
        if ggml_type is not None:
            n, k = weights[f"{name}.weight"].shape
            solves[name] = make(ggml_type, n, k, i)
    return solves


def zero_solves(mix: str) -> dict[str, GGMLWeight]:
    return solves_of(mix, lambda t, n, k, _: zero_blocks(t, n, k))


# --- mixes --------------------------------------------------------------------------------------------------


def test_mix_names_aliases_and_unknown_mixes() -> None:
    assert set(mix_names()) >= {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
                                "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"}
    assert get_mix("Q4_K") is MIXES["Q4_K_M"] and get_mix(None) is MIXES["F16"] and get_mix("Q5_K").name == "Q5_K_M"
    assert {name: int(m.file_type) for name, m in MIXES.items() if name in ("F16", "Q8_0", "Q4_K_M", "BF16")} == {
        "F16": 1, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32}
    with pytest.raises(ConfigError, match=r"unknown GGUF mix 'Q4_K_X'; valid: F32, F16, .*Q4_K_M"):
        get_mix("Q4_K_X")
    with pytest.raises(ConfigError, match="valid"):
        linear_types("IQ2_XXS", DEMO_MODEL)


def test_q4_k_m_on_the_demo_model_is_the_worked_example() -> None:
    """FORMATS.md §5.9: blk.2/3 attn_v and ffn_down Q6_K, token_embd Q6_K (tied), the rest Q4_K, norms F32."""
    types = linear_types("Q4_K_M", DEMO_MODEL)
    bumped = {f"model.layers.{b}.{p}" for b in (2, 3) for p in ("self_attn.v_proj", "mlp.down_proj")}
    assert set(types) == set(LINEARS)
    assert {name for name, t in types.items() if t is T.Q6_K} == bumped
    assert {t for name, t in types.items() if name not in bumped} == {T.Q4_K}
    assert set(linear_types("F16", DEMO_MODEL).values()) == {None}
    plan = TensorPlan.from_checkpoint(DEMO_MODEL)
    all_types = tensor_types("Q4_K_M", plan.facts, plan.gguf_shapes())
    assert all_types["token_embd.weight"] is T.Q6_K and "output.weight" not in all_types
    assert {t for name, t in all_types.items() if "norm" in name} == {T.F32}


def test_rules_without_a_model() -> None:
    """The branches the demo model does not reach: GQA ≥ 4, 70B, shape fallbacks, imatrix, untied output."""
    shapes = {"token_embd.weight": (32000, 4096), "output.weight": (32000, 4096),
              **{f"blk.{i}.{t}.weight": (4096, 4096) for i in range(80) for t in ("attn_v", "ffn_down")}}
    gqa = ModelFacts(arch="llama", n_layer=80, n_head=64, n_head_kv=8)
    q2 = tensor_types("Q2_K", gqa, shapes)
    assert q2["blk.0.attn_v.weight"] is T.Q5_K  # Q4_K for GQA 8, then the 70B bump
    assert q2["output.weight"] is T.Q6_K and q2["token_embd.weight"] is T.Q2_K and q2["blk.5.ffn_down.weight"] is T.Q3_K
    mha = replace(gqa, n_head_kv=64)  # 80 layers without GQA is llama's "65B": no bump
    assert tensor_types("Q2_K", mha, shapes)["blk.0.attn_v.weight"] is T.Q3_K
    assert tensor_types("Q4_0", mha, shapes, imatrix=True)["blk.9.ffn_down.weight"] is T.Q4_1
    assert tensor_types("Q4_0", mha, shapes, imatrix=True)["blk.10.ffn_down.weight"] is T.Q4_0
    odd = {"output.weight": (100, 96), "blk.0.ffn_down.weight": (96, 200), "blk.0.attn_v.weight": (96, 96)}
    small = ModelFacts(arch="qwen2", n_layer=1, n_head=4, n_head_kv=4)
    got = tensor_types("Q4_K_M", small, odd)
    assert got == {"output.weight": T.Q8_0, "blk.0.ffn_down.weight": T.F16, "blk.0.attn_v.weight": T.Q8_0}
    assert tensor_types("Q4_K_S", small, odd)["blk.0.attn_v.weight"] is T.Q5_1


def tiny_odd(root: Path) -> Path:
    """A qwen2 of 8 layers, GQA 4, untied, hidden 96 (no K-quant block fits), ffn 200 (not even 32 fits)."""
    return tiny_model(root / "odd", model_type="qwen2", tokenizer=small_tokenizer(root / "tok", 512), vocab_size=512,
                      hidden_size=96, intermediate_size=200, num_attention_heads=4, num_key_value_heads=1,
                      num_hidden_layers=8, tie_word_embeddings=False)


def tiny_gqa(root: Path) -> Path:
    """8 layers, GQA 4, untied, K-quant friendly shapes (the Q2_K attn_v bump and use_more_bits spread)."""
    return tiny_model(root / "gqa", tokenizer=small_tokenizer(root / "tok", 512), vocab_size=512,
                      hidden_size=256, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=32, num_hidden_layers=8, tie_word_embeddings=False)


def test_every_mix_matches_llama_quantize(tmp_path: Path) -> None:
    """Source of truth: llama.cpp's `llama_model_quantize` (what llama-quantize runs) on our F16 files."""
    for source in (DEMO_MODEL, tiny_odd(tmp_path), tiny_gqa(tmp_path)):
        f16 = write_artifact(tmp_path / f"{source.name}-f16", source=source)
        outputs = {int(m.file_type): tmp_path / f"{source.name}-{m.name}.gguf" for m in MIXES.values()}
        llama_quantize(f16, outputs)
        plan = TensorPlan.from_checkpoint(source)
        for mix in MIXES.values():
            ours = tensor_types(mix, plan.facts, plan.gguf_shapes())
            assert ours == file_types(outputs[int(mix.file_type)]), (source.name, mix.name)


def test_the_writer_takes_either_imatrix_choice(tmp_path: Path) -> None:
    """Q4_0 with an importance matrix moves the first n/8 ffn_down to Q4_1: the solves say which was used."""
    source = tiny_model(tmp_path / "m", tokenizer=small_tokenizer(tmp_path / "tok", 512), vocab_size=512,
                        num_hidden_layers=8)
    plain, informed = linear_types("Q4_0", source), linear_types("Q4_0", source, imatrix=True)
    down0 = "model.layers.0.mlp.down_proj"
    assert (plain[down0], informed[down0]) == (T.Q4_0, T.Q4_1)
    assert {n for n in plain if plain[n] != informed[n]} == {down0}
    for name, types in (("plain", plain), ("imatrix", informed)):
        weights = load_file(source / "model.safetensors")
        solves = {n: zero_blocks(t, *weights[f"{n}.weight"].shape) for n, t in types.items() if t is not None}
        path = write_artifact(tmp_path / name, "Q4_0", solves, source=source)
        assert file_types(path)["blk.0.ffn_down.weight"] is types[down0]


# --- the F16 file: metadata, tokenizer, layout, read back ----------------------------------------------------


def test_f16_artifact_layout_and_metadata(f16: Path) -> None:
    assert f16.name == "model-F16.gguf" and sorted(p.name for p in f16.parent.iterdir()) == [
        "manifest.json", "model-F16.gguf"]
    assert verify_manifest(f16.parent).format is Format.GGUF
    layout = validate(f16)
    V = gguf.GGUFValueType
    u32 = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
           "attention.head_count_kv", "rope.dimension_count", "vocab_size")
    assert all(layout.kv_types[f"llama.{k}"] == (V.UINT32, None) for k in u32)
    assert layout.kv_types["llama.rope.freq_base"] == layout.kv_types["llama.attention.layer_norm_rms_epsilon"] == (
        V.FLOAT32, None)
    assert layout.kv_types["tokenizer.ggml.token_type"] == (V.ARRAY, V.INT32)
    assert layout.array_lengths["tokenizer.ggml.tokens"] == layout.array_lengths["tokenizer.ggml.token_type"] == 4096
    meta = read(f16.parent).metadata
    assert {k: meta[k] for k in ("general.architecture", "general.file_type", "general.quantization_version",
                                 "llama.context_length", "llama.embedding_length", "llama.block_count",
                                 "llama.feed_forward_length", "llama.attention.head_count",
                                 "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.vocab_size",
                                 "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                                 "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token")} == {
        "general.architecture": "llama", "general.file_type": 1, "general.quantization_version": 2,
        "llama.context_length": 1024, "llama.embedding_length": 256, "llama.block_count": 4,
        "llama.feed_forward_length": 768, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64, "llama.vocab_size": 4096, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False}
    assert meta["llama.rope.freq_base"] == 10000.0 and meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(
        1e-5)
    assert read(f16).config["rms_norm_eps"] == 1e-5
    # ggml order: ne[0] is the input dim; tensors sit at Σ pad(nbytes) in record order
    records = {r.name: r for r in layout.tensors}
    assert records["blk.0.attn_k.weight"].ne == (256, 128) and records["token_embd.weight"].ne == (256, 4096)
    assert "output.weight" not in records and records["output_norm.weight"].type == gguf.GGMLQuantizationType.F32
    offset = 0
    for record in layout.tensors:
        assert record.offset == offset
        offset += -(-record.nbytes // 32) * 32
    assert f16.stat().st_size == layout.data_offset + offset


def test_tokenizer_keys_equal_tokenizer_json(f16: Path) -> None:
    meta = read(f16).metadata
    vocab = TOKENIZER["model"]["vocab"]
    assert meta["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.__getitem__)
    assert meta["tokenizer.ggml.merges"] == [" ".join(pair) for pair in TOKENIZER["model"]["merges"]]
    assert meta["tokenizer.ggml.token_type"] == [3] + [1] * 4095  # <|endoftext|> is CONTROL


def test_f16_reads_back_as_the_source(f16: Path) -> None:
    ckpt = read(f16)
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert {k: ckpt.config[k] for k in ("hidden_size", "num_key_value_heads", "head_dim", "vocab_size",
                                        "tie_word_embeddings", "model_type", "max_position_embeddings")} == {
        k: config[k] for k in ("hidden_size", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
                               "model_type", "max_position_embeddings")}
    state = ckpt.dense_state_dict()
    assert set(state) == set(SOURCE)  # q/k un-permuted, no lm_head (tied)
    for name, tensor in SOURCE.items():
        assert torch.equal(state[name], tensor.float().half().float() if tensor.dim() == 2 else tensor.float()), name
    assert ckpt.quantized_weights() == {}


def test_permutation_moves_whole_rows() -> None:
    order = rope_rows(8, 2)  # 2 heads of 4 rows: within a head, rows (0, 2, 1, 3)
    assert order.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = torch.arange(8 * 3).reshape(8, 3)
    reference = w.reshape(2, 2, 2, 3).swapaxes(1, 2).reshape(8, 3)  # convert_hf_to_gguf's permute
    assert torch.equal(w[order], reference)


# --- quantized mixes: exact bytes, three dequantizers agree --------------------------------------------------


def test_q4_k_m_checklist(tmp_path: Path) -> None:
    """FORMATS.md §8 GGUF 1 to 4 on the demo model (blocks of random bits: the file, not the solver, is tested)."""
    solves = solves_of("Q4_K_M", random_blocks)
    path = write_artifact(tmp_path / "q4km", "Q4_K_M", solves)
    types = file_types(path)
    assert {n for n, t in types.items() if t is T.Q6_K} == {"token_embd.weight", "blk.2.attn_v.weight",
                                                            "blk.3.attn_v.weight", "blk.2.ffn_down.weight",
                                                            "blk.3.ffn_down.weight"}
    assert {t for n, t in types.items() if "norm" in n} == {T.F32}
    assert {t for n, t in types.items() if "norm" not in n and t is not T.Q6_K} == {T.Q4_K}
    meta = read(path).metadata
    assert (meta["general.file_type"], meta["general.quantization_version"]) == (15, 2)
    ckpt = read(path)
    back = ckpt.quantized_weights()
    assert set(back) == set(solves)
    for name, solved in solves.items():
        assert torch.equal(back[name].data, solved.data), name  # exactly the bytes solved, after un-permuting


@pytest.fixture(scope="module")
def typed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two blocks of K-quant friendly shapes, GQA 4, untied, a 512-token vocabulary: every mix in seconds."""
    root = tmp_path_factory.mktemp("typed")
    return tiny_model(root / "model", tokenizer=small_tokenizer(root / "tok", 512), vocab_size=512,
                      hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=64, num_hidden_layers=2, tie_word_embeddings=False)


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_L", "Q4_K_M", "BF16", "F32"])
def test_every_type_reads_back_as_gguf_py_dequantizes_it(tmp_path: Path, typed_model: Path, mix: str) -> None:
    """These mixes hold every type (Q3_K_L: Q3_K, Q5_K; all: Q6_K output). Random blocks (all code patterns)
    go in as they are: the file's bytes are exactly them
    (rows permuted for q/k), and gguf-py's dequantizer of those bytes == our reader's dense weights ==
    `GGMLWeight.dequantize()`; the embedding and output (encoded by the writer) read back as gguf-py reads them."""
    solves = solves_of(mix, random_blocks, typed_model)
    path = write_artifact(tmp_path / mix, mix, solves, source=typed_model)
    ckpt = read(path)
    dense = ckpt.dense_state_dict()
    back = ckpt.quantized_weights()
    hf_names = {ckpt.plan.gguf_name(name): name for name in ckpt.records}
    for tensor in gguf.GGUFReader(path).tensors:
        name = hf_names[tensor.name]
        oracle = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32))
        order = ckpt.plan.row_order(name)
        if order is not None:
            oracle = oracle[torch.argsort(order)]
        assert torch.equal(dense[name], oracle.reshape(dense[name].shape)), (mix, tensor.name)
        linear = name.removesuffix(".weight")
        if linear in solves:
            stored = torch.from_numpy(np.array(tensor.data)).reshape(solves[linear].data.shape)
            assert torch.equal(stored, solves[linear].data if order is None else solves[linear].data[order])
            assert torch.equal(back[linear].data, solves[linear].data), (mix, name)
            assert torch.equal(solves[linear].dequantize(), dense[name]), (mix, name)
    assert set(back) == set(solves)
    assert get_mix(mix).default in set(file_types(path).values())


# --- llama.cpp ------------------------------------------------------------------------------------------------


def test_llama_cpp_tokenizes_like_hf_and_computes_like_transformers(
    f16: Path, tmp_path: Path, demo_lm: torch.nn.Module
) -> None:
    from transformers import AutoTokenizer

    text = eval_text(400)
    hf_ids = AutoTokenizer.from_pretrained(DEMO_MODEL)(text).input_ids
    ids, logits = llama_cpp_run(f16, text, tmp_path, n_eval=256)
    assert ids == hf_ids and len(ids) >= 200
    with torch.no_grad():
        expected = demo_lm(torch.tensor([ids[:256]])).logits[0].numpy()
    diff = float(np.abs(logits - expected).max())
    assert diff < 0.05, f"llama.cpp F16 vs transformers: max |Δlogit| {diff}"  # fp16 weights and activations
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.98


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_S", *(pytest.param(m, marks=pytest.mark.slow) for m in (
    "Q6_K", "Q5_K_S", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q3_K_S", "Q2_K"))])
def test_llama_cpp_runs_every_type_as_our_reader_reads_it(tmp_path: Path, mix: str) -> None:
    """Each block type, written from RTN solves of the demo model, loads and runs in llama.cpp, and
    llama.cpp computes what transformers computes on our reader's dequantized weights: the blocks mean
    the same to both (llama.cpp rounds activations to 8 bits for K-quant dot products, hence the slack)."""
    from bitsmith.models.base import build_causal_lm

    path = write_artifact(tmp_path / mix, mix, solve_rtn(mix))
    ids, logits = llama_cpp_run(path, eval_text(300), tmp_path, n_eval=128)
    with torch.no_grad():
        expected = build_causal_lm(DEMO_MODEL, read(path).dense_state_dict())(torch.tensor([ids[:128]])).logits
    expected = expected[0].numpy()
    assert np.isfinite(logits).all()
    assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.95, mix
    assert float(np.abs(logits - expected).max()) < 0.1 * float(np.abs(expected).max()), mix


@pytest.mark.parametrize("model_type,config", [
    ("qwen2", {}),  # NEOX RoPE (no permutation), q/k/v biases
    ("llama", {"attention_bias": True, "tie_word_embeddings": False}),  # permuted biases, an output tensor
    ("mistral", {"num_key_value_heads": 1}),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}}),
], ids=["qwen2", "llama-bias-untied", "mistral", "linear-rope"])
def test_llama_cpp_matches_transformers_on_other_layouts(tmp_path: Path, model_type: str, config: dict) -> None:
    import transformers

    source = tiny_model(tmp_path / model_type, model_type=model_type, **config)
    path = write_artifact(tmp_path / "art", "F32", source=source)
    ids = list(range(5, 69))
    _, logits = llama_cpp_run(path, "x", tmp_path, ids=ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - expected).max() < 1e-3 * max(1.0, float(np.abs(expected).max()))
    back = read(path).dense_state_dict()
    assert all(torch.equal(back[n], t) for n, t in load_file(source / "model.safetensors").items())


TOKENIZER_TEXT = ("And he said, I'll go; they've 12 sheep and 1234567 goats.\n\n"
                  "def f(x):\n    return x ** 2  # naïve café\n  \tdone?!  ")


@pytest.mark.parametrize("pre", sorted(SPLIT_PRE.values()))
def test_llama_cpp_tokenizes_split_regex_bpe_like_hf(tmp_path: Path, pre: str) -> None:
    """Llama-3-style and Qwen2-style tokenizer.json files: llama.cpp's `pre` runs the same regex as HF."""
    from tokenizers import Tokenizer

    regex = next(r for r, name in SPLIT_PRE.items() if name == pre)
    tokenizer = byte_level_bpe(tmp_path / "tok", regex, ignore_merges=IGNORE_MERGES[pre])
    hf = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    source = tiny_model(tmp_path / "model", tokenizer=tokenizer, vocab_size=hf.get_vocab_size())
    path = write_artifact(tmp_path / "art", source=source)
    assert read(path).metadata["tokenizer.ggml.pre"] == pre
    text = TOKENIZER_TEXT + eval_text(300)
    ids, _ = llama_cpp_run(path, text, tmp_path, n_eval=1)
    assert ids == hf.encode(text).ids


def test_llama_cpp_tokenizes_sentencepiece_like_sentencepiece(tmp_path: Path) -> None:
    import sentencepiece as spm

    tokenizer = sentencepiece_model(tmp_path / "tok", "bpe")
    processor = spm.SentencePieceProcessor(model_file=str(tokenizer / "tokenizer.model"))
    n_vocab = processor.vocab_size()
    source = tiny_model(tmp_path / "model", tokenizer=tokenizer, vocab_size=n_vocab)
    path = write_artifact(tmp_path / "art", source=source)
    meta = read(path).metadata
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.add_bos_token"],
            meta["tokenizer.ggml.add_space_prefix"]) == ("llama", processor.bos_id(), True, True)
    assert meta["tokenizer.ggml.scores"] == pytest.approx([processor.GetScore(i) for i in range(n_vocab)])
    assert meta["tokenizer.ggml.token_type"][:4] == [2, 3, 3, 6]  # <unk>, <s>, </s>, <0x00>
    text = "And God said, Let there be light: and there was light.\nThen 42 naïve sheep."
    ids, _ = llama_cpp_run(path, text, tmp_path, n_eval=1)
    assert ids == processor.encode(text)


@pytest.mark.parametrize("model_type,normalization,match", [("unigram", "identity", "of type 1"),
                                                             ("bpe", "nmt_nfkc", "normalizes text")])
def test_sentencepiece_models_llama_cpp_would_not_reproduce_are_refused(
    tmp_path: Path, model_type: str, normalization: str, match: str
) -> None:
    tokenizer = sentencepiece_model(tmp_path / "tok", model_type, normalization=normalization)
    with pytest.raises(UnsupportedError, match=match):
        read_vocab(tokenizer, {"vocab_size": 600})


# --- the validator: hostile files ----------------------------------------------------------------------------


def _arch_kv() -> bytes:
    return kv("general.architecture", STRING, gguf_string("llama"))


def _hostile_cases(f16_bytes: bytes, data_offset: int) -> dict[str, tuple[bytes, str]]:
    truncations = (20, 200, 30_000, data_offset - 100, len(f16_bytes) - 1000)  # header, KVs, vocab, records, data
    info, data = f32_tensor("a.weight", np.ones((2, 32), np.float32))
    ok = raw_gguf([_arch_kv()], [info], data)
    q8 = tensor_info("q.weight", (48, 2), 8, 0)  # Q8_0 rows of 48: not a multiple of its 32-block
    return {
        "wrong magic": (b"GGML" + ok[4:], "magic"),
        "version 2": (raw_gguf(version=2), "version 2"),
        "big-endian": (b"GGUF" + struct.pack(">I", 3) + ok[8:], "big-endian"),
        "absurd tensor count": (raw_gguf(n_tensors=2**62), "tensor count"),
        "absurd kv count": (raw_gguf(n_kv=2**40), "KV count"),
        "count beyond int64": (raw_gguf(n_tensors=2**64 - 1), "tensor count"),
        "huge string": (raw_gguf([struct.pack("<Q", 2**60) + b"k" * 40]), "claims"),
        "huge array": (raw_gguf([kv("a", ARRAY, struct.pack("<IQ", UINT32, 2**61))]), "length of array"),
        "nested array": (raw_gguf([kv("a", ARRAY, struct.pack("<IQ", ARRAY, 1))]), "nests arrays"),
        "bad value type": (raw_gguf([kv("a", 13, bytes(8))]), "not a GGUF value type"),
        "duplicate key": (raw_gguf([_arch_kv(), _arch_kv()]), "duplicate key"),
        "empty key": (raw_gguf([kv("", UINT32, b"\0\0\0\0")]), "empty key"),
        "wrong key type": (raw_gguf([kv("general.alignment", STRING, gguf_string("32"))]), "needs UINT32"),
        "alignment 24": (raw_gguf([kv("general.alignment", UINT32, struct.pack("<I", 24))]), "power of two"),
        "n_dims 5": (raw_gguf([], [gguf_string("t") + struct.pack("<I5qiQ", 5, 1, 1, 1, 1, 1, 0, 0)]),
                     "5 dimensions"),
        "ne 0": (raw_gguf([], [tensor_info("t", (0, 4), 0, 0)]), "must be ≥ 1"),
        "ne overflow": (raw_gguf([], [tensor_info("t", (2**40, 2**40), 0, 0)]), "overflows int64"),
        "bad type id": (raw_gguf([], [tensor_info("t", (32,), 4, 0)]), "unknown ggml type 4"),
        "block does not divide": (raw_gguf([], [q8], bytes(128)), "not a multiple of its block 32"),
        "offset mismatch": (raw_gguf([], [info, tensor_info("b.weight", (32, 2), 0, 64)], data * 2),
                            "offset 64, expected 256"),
        "duplicate tensor": (raw_gguf([], [info, tensor_info("a.weight", (32, 2), 0, 256)], data * 2),
                             "duplicate tensor"),
        "data past the end": (raw_gguf([], [info], data[:100]), "truncated"),
        "trailing bytes": (ok + bytes(32), "follow the last tensor"),
        "token arrays disagree": (raw_gguf([kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 1)
                                              + gguf_string("a")),
                                           kv("tokenizer.ggml.token_type", ARRAY, struct.pack("<IQ2i", 5, 2, 1, 1))]),
                                  "2 entries for 1 tokens"),
        **{f"truncated at byte {cut}": (f16_bytes[:cut], "truncated|claims|cannot fit") for cut in truncations},
        "empty": (b"", "empty file"),
    }


def test_hostile_files_raise_format_error_quickly(tmp_path: Path, f16: Path) -> None:
    import time

    info, data = f32_tensor("a.weight", np.ones((2, 32), np.float32))
    good = tmp_path / "good.gguf"
    good.write_bytes(raw_gguf([_arch_kv()], [info], data))
    assert [r.name for r in validate(good).tensors] == ["a.weight"]
    for case, (content, match) in _hostile_cases(f16.read_bytes(), validate(f16).data_offset).items():
        path = tmp_path / "bad.gguf"
        path.write_bytes(content)
        start = time.monotonic()
        with pytest.raises(FormatError, match=match):
            validate(path)
        with pytest.raises(FormatError):
            read(path)
        assert time.monotonic() - start < 2.0, case
    with pytest.raises(NotFoundError):
        validate(tmp_path / "missing.gguf")


def test_reader_refuses_files_it_cannot_map(tmp_path: Path) -> None:
    info, data = f32_tensor("a.weight", np.ones((2, 32), np.float32))
    path = tmp_path / "odd.gguf"
    path.write_bytes(raw_gguf([kv("general.architecture", STRING, gguf_string("gpt2"))], [info], data))
    with pytest.raises(UnsupportedError, match="'gpt2' is not supported"):
        read(path)
    path.write_bytes(raw_gguf([_arch_kv(), kv("llama.attention.head_count", UINT32, struct.pack("<I", 0))],
                              [info], data))
    with pytest.raises(FormatError, match=r"num_attention_heads must be an integer in \[1, 4096\], the file has 0"):
        read(path)
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        shutil.copyfile(path, tmp_path / "two" / name)
    with pytest.raises(FormatError, match=r"exactly one \.gguf"):
        read(tmp_path / "two")


# --- writer refusals and atomicity ---------------------------------------------------------------------------


def _int_grid() -> QuantizedWeight:
    return QuantizedWeight(codes=torch.zeros(256, 256, dtype=torch.uint8), scales=torch.ones(256, 2),
                           zeros=torch.zeros(256, 2, dtype=torch.int32),
                           g_idx=torch.arange(256, dtype=torch.int32) // 128, scheme=QuantScheme())


Q = "model.layers.0.self_attn.q_proj"
V2 = "model.layers.2.self_attn.v_proj"
REFUSALS: dict[str, tuple[Callable[[], dict[str, Any]], type[Exception], str]] = {
    "integer grid": (lambda: {**zero_solves("Q4_K_M"), Q: _int_grid()}, FormatError, r"q_proj' is an integer grid"),
    "wrong type": (lambda: {**zero_solves("Q4_K_M"), V2: zero_blocks(T.Q4_K, 128, 256)}, FormatError,
                   r"v_proj' was solved to Q4_K, but mix Q4_K_M gives it Q6_K"),
    "missing linear": (lambda: {k: v for k, v in zero_solves("Q4_K_M").items() if k != V2}, FormatError,
                       r"quantizes 'model.layers.2.self_attn.v_proj', but no solve"),
    "not a block linear": (lambda: {**zero_solves("Q4_K_M"), "lm_head": zero_blocks(T.Q6_K, 4096, 256)},
                           ConfigError, "'lm_head' is not a decoder-block linear"),
    "wrong shape": (lambda: {**zero_solves("Q4_K_M"), Q: zero_blocks(T.Q4_K, 128, 256)}, ConfigError,
                    r"source weight is \[256, 256\]"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_writer_refuses_before_writing(tmp_path: Path, case: str) -> None:
    make, error, match = REFUSALS[case]
    out = tmp_path / "art"
    with pytest.raises(error, match=match):
        write_artifact(out, "Q4_K_M", make())
    assert not out.exists() and not staging_dirs(out)


def test_writer_refuses_mixes_sources_and_directories(tmp_path: Path, f16: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(AlreadyExistsError):
        write_gguf(tmp_path / "full", source_model_dir=DEMO_MODEL, quantized={})
    with pytest.raises(FormatError, match="mix F16 keeps every weight in F16"):
        write_artifact(tmp_path / "a", "F16", {Q: zero_blocks(T.Q4_K, 256, 256)})
    with pytest.raises(ConfigError, match="unknown GGUF mix 'Q9'"):
        write_artifact(tmp_path / "b", "Q9")
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    for change, error, match in (({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, UnsupportedError,
                                  "'gpt2' is not supported"),
                                 ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
                                  UnsupportedError, "RoPE scaling 'dynamic'"),
                                 ({"quantization_config": {"quant_method": "gptq"}}, UnsupportedError,
                                  "already quantized")):
        source = tmp_path / "src"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(DEMO_MODEL, source)
        (source / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(error, match=match):
            write_artifact(tmp_path / "c", source=source)
        assert not (tmp_path / "c").exists() and not staging_dirs(tmp_path / "c")


@pytest.mark.parametrize("pre,match", [
    ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, "no llama.cpp pre-tokenizer"),
    ({"type": "Whitespace"}, "no llama.cpp pre-tokenizer"),
], ids=["prefix-space", "whitespace"])
def test_unmappable_tokenizers_are_refused(tmp_path: Path, pre: dict, match: str) -> None:
    source = tmp_path / "src"
    shutil.copytree(DEMO_MODEL, source)
    (source / "tokenizer.json").write_text(json.dumps({**TOKENIZER, "pre_tokenizer": pre}))
    with pytest.raises(UnsupportedError, match=match):
        write_artifact(tmp_path / "art", source=source)
    assert not (tmp_path / "art").exists()


def test_a_failure_while_writing_leaves_nothing(tmp_path: Path) -> None:
    """token_embd is encoded after the header is on disk: a value float16 cannot hold fails there."""
    embed = SOURCE["model.embed_tokens.weight"].float().clone()
    embed[7, 3] = 1e6
    out = tmp_path / "art"
    with pytest.raises(FormatError, match=r"'model\.embed_tokens\.weight' is not finite in F16"):
        write_artifact(out, "F16", dense={"model.embed_tokens.weight": embed})
    assert not out.exists() and not staging_dirs(out) and list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="not in the source"):
        write_artifact(out, "F16", dense={"model.nope": torch.zeros(2)})


def test_dense_replacements_are_written(tmp_path: Path) -> None:
    norm = "model.layers.1.input_layernorm.weight"
    path = write_artifact(tmp_path / "art", "F32", dense={norm: SOURCE[norm].float() * 2})
    assert torch.equal(read(path).dense_state_dict()[norm], SOURCE[norm].float() * 2)


def test_get_format_registers_gguf() -> None:
    handler = get_format(Format.GGUF)
    assert handler.write is write_gguf and handler.read is read


def test_vocab_is_padded_to_the_config(tmp_path: Path) -> None:
    vocab = read_vocab(DEMO_MODEL, {"vocab_size": 4100})
    assert vocab.tokens[4096:] == ["[PAD4096]", "[PAD4097]", "[PAD4098]", "[PAD4099]"]
    assert vocab.token_types[4096:] == [5] * 4
    with pytest.raises(FormatError, match="vocab_size is 4000"):
        read_vocab(DEMO_MODEL, {"vocab_size": 4000})

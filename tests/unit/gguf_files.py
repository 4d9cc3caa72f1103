"""Building GGUF files for tests: artifacts of the demo model, tiny random llama-family models, raw
(possibly malformed) files byte by byte, and llama.cpp run in a child process (it aborts the process on
bad input, which must not take the test runner with it)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bitsmith.demo import DEMO_MODEL
from bitsmith.formats import get_format
from bitsmith.formats.gguf import gguf_file
from bitsmith.manifest import build_artifact
from bitsmith.quantized import GGMLWeight
from bitsmith.schemes import Format, GGMLScheme, GGMLType, GPTQOptions

LLAMA_CPP_TIMEOUT = 120


def write_artifact(out: Path, mix: str | None = None, quantized: Mapping[str, GGMLWeight] | None = None,
                   source: Path = DEMO_MODEL, dense: Mapping[str, torch.Tensor] | None = None) -> Path:
    """A published GGUF artifact (manifest included) of `source` in `mix`; returns its .gguf file."""
    handler = get_format(Format.GGUF)
    build_artifact(out, lambda d: handler.write(d, source_model_dir=source, quantized=dict(quantized or {}),
                                                options=GPTQOptions(), variant=mix, dense=dense),
                   format=Format.GGUF, recipe={})
    return gguf_file(out)


def solve_rtn(mix: str, source: Path = DEMO_MODEL) -> dict[str, GGMLWeight]:
    """Every block linear of `source` quantized (no importance) onto the type `mix` assigns it."""
    from bitsmith.algos import kquant
    from bitsmith.formats.gguf import linear_types
    from safetensors.torch import load_file

    weights = load_file(source / "model.safetensors")
    return {name: kquant.quantize(weights[f"{name}.weight"].float(), ggml_type)
            for name, ggml_type in linear_types(mix, source).items() if ggml_type is not None}


def tiny_model(out: Path, *, model_type: str = "llama", tokenizer: Path = DEMO_MODEL, seed: int = 0,
               **config: Any) -> Path:
    """A random llama-family checkpoint (float32) with the tokenizer files of `tokenizer`."""
    import transformers
    from bitsmith.models import get_adapter

    fields = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=4096, max_position_embeddings=256, tie_word_embeddings=True)
    fields.update(config)
    hf_config = transformers.AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = getattr(transformers, get_adapter(model_type).causal_lm_class)(hf_config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)  # random biases too (transformers initialises them to zero)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    return out


def small_tokenizer(out: Path, n_tokens: int) -> Path:
    """The demo tokenizer cut to its first `n_tokens` ids (and the merges among them), for fast tiny models."""
    data = json.loads((DEMO_MODEL / "tokenizer.json").read_text())
    model = data["model"]
    model["vocab"] = {text: i for text, i in model["vocab"].items() if i < n_tokens}
    model["merges"] = [pair for pair in model["merges"]
                       if {pair[0], pair[1], pair[0] + pair[1]} <= model["vocab"].keys()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data))
    shutil.copyfile(DEMO_MODEL / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


SCALE_OFFSETS = {
    GGMLType.Q8_0: (0,), GGMLType.Q4_0: (0,), GGMLType.Q4_1: (0, 2), GGMLType.Q5_0: (0,), GGMLType.Q5_1: (0, 2),
    GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
}
"""Byte offsets of each block's float16 scale (and min) fields, from FORMATS.md §5.7."""


def random_blocks(ggml_type: GGMLType, n: int, k: int, seed: int = 0) -> GGMLWeight:
    """Blocks of random bits (every code and sub-scale pattern) with finite float16 scales in ±[2⁻¹⁰, 2⁻⁴]."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, k // ggml_type.block_size, ggml_type.type_size), dtype=np.uint8)
    for offset in SCALE_OFFSETS[ggml_type]:
        scale = rng.uniform(2**-10, 2**-4, size=data.shape[:2]) * rng.choice([-1.0, 1.0], size=data.shape[:2])
        data[:, :, offset:offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return GGMLWeight(data=torch.from_numpy(data.reshape(n, -1)), scheme=GGMLScheme(type=ggml_type), in_features=k)


# --- raw files ------------------------------------------------------------------------------------------

STRING, ARRAY, UINT32 = 8, 9, 4


def gguf_string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    """One KV record: key, value type, the value's bytes as given."""
    return gguf_string(key) + struct.pack("<I", value_type) + payload


def tensor_info(name: str, ne: Sequence[int], ggml_type: int, offset: int) -> bytes:
    return gguf_string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}q", *ne) + struct.pack(
        "<iQ", ggml_type, offset)


def raw_gguf(kvs: Sequence[bytes] = (), infos: Sequence[bytes] = (), data: bytes = b"", *, magic: bytes = b"GGUF",
             version: int = 3, n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32) -> bytes:
    """A GGUF file from its parts; the counts default to the parts given, the data is padded in place."""
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + bytes(-len(body) % alignment) + data


def f32_tensor(name: str, values: np.ndarray, offset: int = 0) -> tuple[bytes, bytes]:
    """(tensor record, padded data) of a float32 tensor (ne = numpy shape reversed)."""
    raw = np.ascontiguousarray(values, dtype=np.float32).tobytes()
    return tensor_info(name, values.shape[::-1], 0, offset), raw + bytes(-len(raw) % 32)


# --- llama.cpp in a child process -------------------------------------------------------------------------

_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import llama_cpp
    args = json.loads(sys.argv[1])
    llm = llama_cpp.Llama(model_path=args["model"], logits_all=True, n_ctx=args["n_ctx"], n_threads=1,
                          verbose=False)
    ids = llm.tokenize(args["text"].encode(), add_bos=False, special=False)
    run = args["ids"] if args["ids"] is not None else ids[:args["n_eval"]]
    llm.eval(run)
    np.save(args["logits"], np.array(llm.scores[:len(run)], dtype=np.float32))
    print(json.dumps({"ids": ids, "vocab": llm.n_vocab()}))
""")

_QUANTIZE = textwrap.dedent("""
    import ctypes, json, sys
    import llama_cpp
    args = json.loads(sys.argv[1])
    for ftype, out in args["outputs"]:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 1
        if llama_cpp.llama_model_quantize(args["source"].encode(), out.encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama_model_quantize failed for ftype {ftype}")
""")


def _child(code: str, args: Mapping[str, Any]) -> str:
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                          timeout=LLAMA_CPP_TIMEOUT, check=False)
    if done.returncode != 0:
        raise AssertionError(f"llama.cpp child failed ({done.returncode}): {done.stderr[-3000:]}")
    return done.stdout


def llama_cpp_run(model: Path, text: str, tmp: Path, *, n_eval: int = 256, ids: list[int] | None = None,
                  n_ctx: int = 512) -> tuple[list[int], np.ndarray]:
    """llama.cpp's token ids for `text` and its logits [n, vocab] on `ids` (default: the first `n_eval`)."""
    logits = tmp / "logits.npy"
    out = json.loads(_child(_RUN, {"model": str(model), "text": text, "n_eval": n_eval, "ids": ids,
                                   "n_ctx": n_ctx, "logits": str(logits)}).strip().splitlines()[-1])
    return out["ids"], np.load(logits)


def llama_quantize(source: Path, outputs: Mapping[int, Path]) -> None:
    """llama.cpp's own quantizer (llama-quantize's library call) from `source` to each llama_ftype's path."""
    _child(_QUANTIZE, {"source": str(source), "outputs": [[int(f), str(p)] for f, p in outputs.items()]})


def file_types(path: Path) -> dict[str, GGMLType]:
    """GGUF tensor name → ggml type, as gguf-py reads the file."""
    import gguf

    by_id = {t.ggml_id: t for t in GGMLType}
    return {t.name: by_id[int(t.tensor_type)] for t in gguf.GGUFReader(path).tensors}


# --- tokenizers of other kinds, trained in a second on the demo's calibration prose ------------------------


def training_text(chars: int = 200_000) -> list[str]:
    from bitsmith.demo import CALIB_FILES

    return [line for path in CALIB_FILES for line in path.read_text(encoding="utf-8")[:chars].splitlines() if line]


def byte_level_bpe(out: Path, regex: str, *, ignore_merges: bool, vocab_size: int = 600) -> Path:
    """A tokenizer.json like Llama-3's / Qwen2's: Split on `regex`, then regex-free ByteLevel, BPE."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(training_text(), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    shutil.copyfile(DEMO_MODEL / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def sentencepiece_model(out: Path, model_type: str, vocab_size: int = 600, normalization: str = "identity") -> Path:
    """A llama-style tokenizer.model (byte fallback, dummy prefix, by default no normalization) and a
    tokenizer_config.json naming <s>/</s>."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_text()), model_writer=model,
                                   vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
                                   character_coverage=1.0, normalization_rule_name=normalization,
                                   remove_extra_whitespaces=False, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>", "add_bos_token": True}))
    return out

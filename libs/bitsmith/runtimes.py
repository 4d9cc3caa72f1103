"""Run any checkpoint or artifact bitsmith writes on the engine its target uses, and score it.

Artifacts are read back through their format's reader (never from in-memory tensors), so what is
measured is what was written: GPTQ, AWQ and compressed-tensors as a torch model of their dequantized
weights, ONNX through ONNX Runtime, MLX through mlx, GGUF through llama.cpp in a worker process, and
on NVIDIA through bitsmith's kernels (`ENGINES`, the one dispatch, by target and format). The format
is recognised from the path itself (`artifact_format`); without a quantization block a directory is an
unquantized checkpoint.

Most engines are driven through the calling convention of a transformers causal LM and tokenized with
the tokenizer stored beside the weights. An engine that brings its own tokenizer, decoding loop and clock
(llama.cpp: a GGUF file carries its vocabulary) is a `NativeEngine`: it is still scored through that
convention, over the same windows, but tokenizes and generates itself and reports its own speed.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, AnyStr, Protocol, runtime_checkable

from bitsmith.errors import ConfigError, FormatError, UnsupportedError
from bitsmith.schemes import Format

if TYPE_CHECKING:
    import torch

    from bitsmith.decoding import Decoder

MLX_MARKER = "quantization"
TRTLLM_MARKERS = frozenset({"architecture", "mapping"})
"""Keys of a TensorRT-LLM checkpoint's config.json that no HF config has (HF's is "architectures")."""
GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetResult:
    """Quality of a model on one held-out file (kl / top1 / reference_ppl only with a reference);
    tokens_per_s: the engine's own scoring speed (prompt processing), where it times itself (llama.cpp)."""

    dataset: str
    ppl: float
    tokens: int
    kl: float | None = None
    top1: float | None = None
    reference_ppl: float | None = None
    tokens_per_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True)
class Throughput:
    """`tokens` processed in `seconds` of the engine's own time."""

    tokens: int
    seconds: float

    def __add__(self, other: Throughput) -> Throughput:
        return Throughput(self.tokens + other.tokens, self.seconds + other.seconds)

    def __sub__(self, other: Throughput) -> Throughput:
        return Throughput(self.tokens - other.tokens, self.seconds - other.seconds)

    @property
    def per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationStats:
    """How a native engine's generation went: the prompt in one pass, then one decode step per token
    after the first (the first comes from the prompt pass's logits)."""

    prompt: Throughput
    decode: Throughput
    generated_tokens: int


@runtime_checkable
class NativeEngine(Protocol):
    """An engine with its own tokenizer, decoding loop and clock (see the module docstring)."""

    def tokenize_file(self, file: Path) -> torch.Tensor:
        """The whole text file as the engine tokenizes it, LongTensor [T], no special tokens added."""

    def scored(self) -> Throughput:
        """Tokens the engine has scored so far and the seconds it spent on them."""

    def generate(self, prompt: str, max_new_tokens: int, should_stop: Callable[[], bool],
                 interval_s: float = 0.0) -> Iterator[str | GenerationStats]:
        """Greedy text as it is decoded, joined by `coalesce` over `interval_s` where it is produced, then
        one `GenerationStats` (the token count: a piece may hold several tokens' text, joined by the
        interval or while the consumer was slower than decoding)."""


def _is_gguf(path: Path) -> bool:
    """A ``.gguf`` file, or a directory holding one (bitsmith's GGUF artifact: the file and a manifest)."""
    if path.is_file():
        return path.suffix == GGUF_SUFFIX
    return path.is_dir() and any(path.glob(f"*{GGUF_SUFFIX}"))


def artifact_format(path: Path) -> Format | None:
    """The format of the artifact at `path`, or None for an unquantized checkpoint.

    A GGUF artifact is a ``.gguf`` file or a directory holding one. A TensorRT-LLM checkpoint's config is
    TensorRT-LLM's own (`TRTLLM_MARKERS`, no HF fields). GPTQ, ONNX and the others name themselves in
    ``quantization_config.quant_method``; an MLX artifact carries mlx-lm's own marker,
    the top-level ``quantization`` block (its ``quantization_config`` is mlx-lm's copy of that block,
    without a method).
    """
    config_path = path / "config.json"
    if _is_gguf(path):
        return Format.GGUF
    if not path.is_dir():
        raise ConfigError(f"{path} is neither a directory nor a {GGUF_SUFFIX} file")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise FormatError(f"{path} has no config.json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise FormatError(f"{config_path} must hold a JSON object")
    if config.keys() >= TRTLLM_MARKERS:
        return Format.TRTLLM
    qcfg = config.get("quantization_config")
    if isinstance(qcfg, dict) and "quant_method" in qcfg:
        method = str(qcfg["quant_method"])
    elif isinstance(config.get(MLX_MARKER), dict):
        return Format.MLX
    elif qcfg:
        method = ""
    else:
        return None
    try:
        return Format(method)
    except ValueError:
        raise UnsupportedError(
            f"{path} is quantized with {method!r}, which bitsmith cannot read; known: {[f.value for f in Format]}"
        ) from None


def load_reference(path: Path) -> torch.nn.Module:
    """A float32 transformers model of `path`: its artifact read back and dequantized, or the checkpoint.

    This is bitsmith's own view of what an artifact means, the reference a runtime's logits are held to.
    """
    from bitsmith.formats import get_format
    from bitsmith.formats.base import ForeignConfig
    from bitsmith.models import build_causal_lm, load_causal_lm

    fmt = artifact_format(path)
    if fmt is None:
        return load_causal_lm(path)
    checkpoint = get_format(fmt).read(path)
    config = checkpoint.hf_config() if isinstance(checkpoint, ForeignConfig) else None
    return build_causal_lm(path, checkpoint.dense_state_dict(), config=config)


def _onnx_runtime(path: Path) -> torch.nn.Module:
    from bitsmith.formats.onnx.runtime import OnnxCausalLM

    return OnnxCausalLM(path)


def _mlx_runtime(path: Path) -> torch.nn.Module:
    from bitsmith.formats.mlx.runtime import MlxCausalLM

    return MlxCausalLM(path)


def _gguf_runtime(path: Path) -> torch.nn.Module:
    from bitsmith.formats.gguf.runtime import GgufCausalLM

    return GgufCausalLM(path)


class _LoadedModel:
    """One loaded model, reused while the key stays the same; the old one is dropped before a new one loads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: object = None
        self._model: torch.nn.Module | None = None

    def get(self, key: object, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        with self._lock:
            if self._model is None or key != self._key:
                self._key, self._model = None, None
                self._model, self._key = load(), key
            return self._model


_KERNEL_MODEL = _LoadedModel()


def _nvidia_runtime(path: Path) -> torch.nn.Module:
    """The NVIDIA engine of `path`, kept loaded for the next call on the same files (their names, times
    and sizes: a rewritten artifact reloads). Loading puts the whole model on the GPU, tens of seconds for
    8B, and Evaluate and Generate come in series per artifact; one model at a time, so the GPU never
    holds two."""
    from bitsmith.nvidia import load_kernel_model

    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = (str(path.resolve()), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    return _KERNEL_MODEL.get(key, lambda: load_kernel_model(path))


class Target(StrEnum):
    """A kind of machine artifacts are proven on; each runs some formats, each format on one engine."""

    CPU = "cpu"
    APPLE = "apple"
    NVIDIA = "nvidia"


Engine = Callable[[Path], "torch.nn.Module"]

ENGINES: Mapping[Target, Mapping[Format | None, Engine]] = MappingProxyType({
    Target.CPU: MappingProxyType({
        None: load_reference, Format.GPTQ: load_reference, Format.ONNX: _onnx_runtime, Format.AWQ: load_reference,
        Format.COMPRESSED_TENSORS: load_reference, Format.GGUF: _gguf_runtime,
    }),
    Target.APPLE: MappingProxyType({Format.MLX: _mlx_runtime}),
    Target.NVIDIA: MappingProxyType(dict.fromkeys(
        (None, Format.GPTQ, Format.AWQ, Format.COMPRESSED_TENSORS, Format.MODELOPT, Format.TRTLLM), _nvidia_runtime)),
})
"""The engine each target runs each format on (None: an unquantized checkpoint). CPU: GPTQ, AWQ and
compressed-tensors by torch on their dequantized weights, ONNX by ONNX Runtime, GGUF by llama.cpp;
Apple: MLX by mlx; NVIDIA: bitsmith's kernels (`bitsmith.nvidia`: Triton W4A16/W8A16, FP8 tensor cores,
their torch twins without a GPU). Every engine answers the calling convention of a transformers causal LM
(``model(ids, past_key_values=..., use_cache=...)``; llama.cpp's only without a cache, being a
`NativeEngine` that decodes itself)."""

HOME_TARGET: Mapping[Format | None, Target] = MappingProxyType({
    None: Target.CPU, Format.GPTQ: Target.CPU, Format.ONNX: Target.CPU, Format.AWQ: Target.CPU,
    Format.COMPRESSED_TENSORS: Target.CPU, Format.GGUF: Target.CPU, Format.MLX: Target.APPLE,
    Format.MODELOPT: Target.NVIDIA, Format.TRTLLM: Target.NVIDIA,
})
"""Where an artifact runs when no target is named: the cheapest engine that runs its format faithfully.
ModelOpt and TensorRT-LLM checkpoints exist only for NVIDIA and may carry FP8 activations, which only the
NVIDIA engine applies (its twins do so on any machine)."""


def home_target(path: Path, fmt: Format | None) -> Target:
    """Where the artifact at `path` (of format `fmt`) runs when no target is named: its format's
    `HOME_TARGET`, except that a compressed-tensors file with FP8 linears (a float-quantized group) runs
    on NVIDIA, whose engine alone casts their activations to FP8 (torch on the dequantized weights would
    score the weights alone)."""
    if fmt is Format.COMPRESSED_TENSORS:
        from bitsmith.formats.compressed_tensors.constants import FLOAT_QUANTIZED

        qcfg = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config", {})
        groups = qcfg.get("config_groups") if isinstance(qcfg, dict) else None
        formats = {qcfg.get("format")} | {g.get("format") for g in (groups or {}).values() if isinstance(g, dict)}
        if FLOAT_QUANTIZED in formats:
            return Target.NVIDIA
    return HOME_TARGET[fmt]


def load_model(path: Path, *, target: Target | None = None) -> torch.nn.Module:
    """The model at `path` on `target`'s engine for its format (default: `home_target`)."""
    fmt = artifact_format(path)
    target = home_target(path, fmt) if target is None else Target(target)
    engine = ENGINES[target].get(fmt)
    if engine is None:
        allowed = sorted("checkpoint" if f is None else f.value for f in ENGINES[target])
        raise UnsupportedError(f"{path} is {'a checkpoint' if fmt is None else fmt.value}; the {target.value} "
                               f"runtime runs {allowed}")
    return engine(path)


@functools.lru_cache(maxsize=4)
def _reference(path: str) -> torch.nn.Module:
    return load_reference(Path(path))


@functools.lru_cache(maxsize=1)
def _device_reference(path: str) -> torch.nn.Module:
    """The unquantized model the NVIDIA target compares against, on the engine's own device and dtype: a
    float32 copy on the host would hold 4 bytes per weight (32 GB for 8B) and run at the host's speed."""
    from bitsmith.nvidia import load_kernel_model

    return load_kernel_model(Path(path))


def evaluate_path(path: Path, files: Sequence[Path], *, seq_len: int = 512, reference: Path | None = None,
                  target: Target | None = None) -> list[DatasetResult]:
    """Perplexity of `path` on each file; with `reference`, also KL, top-1 and the reference's ppl.

    Text is tokenized with the tokenizer stored beside the weights (artifacts carry a copy), or by a
    `NativeEngine` itself; the reference scores the same token windows.
    """
    from bitsmith.evaluate import evaluate, tokenize_file

    if not files:
        raise ConfigError("evaluation needs at least one data file")
    target = home_target(path, artifact_format(path)) if target is None else Target(target)
    model = load_model(path, target=target)
    native = model if isinstance(model, NativeEngine) else None
    ref_model = None
    if reference is not None:
        ref_model = (_device_reference if target is Target.NVIDIA else _reference)(str(reference.resolve()))
    results = []
    for file in files:
        tokens = native.tokenize_file(file) if native is not None else tokenize_file(path, file)
        before = native.scored() if native is not None else None
        scored = evaluate(model, tokens, seq_len=seq_len, reference=ref_model)
        speed = (native.scored() - before).per_second if native is not None and before is not None else None
        results.append(DatasetResult(dataset=str(file), ppl=scored.ppl, tokens=scored.predictions,
                                     kl=scored.kl, top1=scored.top1, reference_ppl=scored.reference_ppl,
                                     tokens_per_s=speed))
    return results


def generate_greedy(path: Path, prompt: str, max_new_tokens: int, *,
                    should_stop: Callable[[], bool] = lambda: False,
                    target: Target | None = None,
                    chunk_interval_s: float = 0.0) -> Iterator[str | GenerationStats]:
    """Greedy decoding from the model at `path`, yielding new text as it comes, ending with the engine's
    `GenerationStats` where it keeps them.

    Text within `chunk_interval_s` of the last piece sent is joined to the next (see `coalesce`; 0: each
    token's text, or from a `NativeEngine` all that arrived since the consumer last asked).
    """
    if not prompt:
        raise ConfigError("the prompt is empty")
    if not 0 <= chunk_interval_s < math.inf:
        raise ConfigError(f"the chunk interval must be a finite number of seconds >= 0, got {chunk_interval_s}")
    model = load_model(path, target=target)
    if isinstance(model, NativeEngine):
        yield from model.generate(prompt, max_new_tokens, should_stop, chunk_interval_s)
    else:
        yield from coalesce(_greedy_pieces(model, path, prompt, max_new_tokens, should_stop), chunk_interval_s)


def coalesce(pieces: Iterator[AnyStr | GenerationStats], interval_s: float) -> Iterator[AnyStr | GenerationStats]:
    """`pieces` with the text that came within `interval_s` of the last piece sent joined into one.

    Why: a streamed message costs its sender tens of microseconds (a gRPC message, a wake-up of the
    client), which is a large share of a small model's decode step; a stream read by a person or by a
    program that buffers anyway loses nothing by getting, say, 10 ms of tokens at once. Text that waits
    goes with the next piece (one decode step later) or at the end; the first piece never waits, and a
    model whose step is longer than the interval streams token by token.
    """
    pending: list[AnyStr] = []
    sent_at = -math.inf
    for piece in pieces:
        if isinstance(piece, GenerationStats):
            if pending:
                yield pending[0][:0].join(pending)
                pending = []
            yield piece
            continue
        pending.append(piece)
        now = time.monotonic()
        if now - sent_at >= interval_s:
            yield piece[:0].join(pending)
            pending, sent_at = [], now
    if pending:
        yield pending[0][:0].join(pending)


def _greedy_pieces(model: torch.nn.Module, path: Path, prompt: str, max_new_tokens: int,
                   should_stop: Callable[[], bool]) -> Iterator[str]:
    """Each greedy token's text from a model driven through the transformers calling convention."""
    from bitsmith.decoding import DynamicDecoder

    return greedy_pieces(DynamicDecoder(model), path, prompt, max_new_tokens, should_stop)


def greedy_pieces(decoder: Decoder, path: Path, prompt: str, max_new_tokens: int,
                  should_stop: Callable[[], bool], device: torch.device | str = "cpu") -> Iterator[str]:
    """Each greedy token's text, tokenized by the tokenizer stored at `path`; `decoder` runs the model on
    token ids placed on `device` and keeps the KV cache (an engine that times its steps wraps it)."""
    import torch  # here, not at the top: llama.cpp needs neither transformers nor its import time
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompt_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    emitted = ""
    generated: list[int] = []
    with torch.no_grad():
        for index in range(max_new_tokens):
            if should_stop():
                return
            if index == 0:
                logits = decoder.begin(prompt_ids, max_new_tokens)
            else:
                logits = decoder.step(torch.tensor([[generated[-1]]], device=device))
            token = int(logits.argmax())
            if token == tokenizer.eos_token_id:
                return
            generated.append(token)
            text = str(tokenizer.decode(generated))
            yield text[len(emitted):]
            emitted = text

"""The NVIDIA engine: an artifact as a transformers model whose quantized linears run bitsmith's kernels.

Why not the dequantized reference: an artifact is only worth the speed and quality it has on its target,
so runtime_nvidia measures what a deployment would run — W4A16/W8A16 linears on the Triton GEMM (the
packed codes stay packed in GPU memory), FP8 linears on FP8 tensor cores with their activations cast to
FP8 per token or with the calibrated scale — and times itself. The same loader on a machine without a
GPU runs every kernel's torch twin, so CI exercises this path and its FP8 activation rounding exactly.

The model is built on the meta device and filled tensor by tensor: quantized linears become
`bitsmith.kernels.linear` modules straight from the format reader's weights, everything else is
loaded in the activation dtype (bfloat16 on a GPU, float32 on a CPU). Nothing float of the quantized
linears is ever materialised, so an artifact needs its own size in GPU memory, not the float model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from bitsmith.decoding import Decoder, StaticDecoder
from bitsmith.errors import FormatError, UnsupportedError
from bitsmith.kernels import KernelPreference
from bitsmith.quantized import FP8Weight, QuantizedWeight
from bitsmith.runtimes import GenerationStats, Throughput, artifact_format, coalesce, greedy_pieces

GPU_DTYPE = torch.bfloat16
"""Activation dtype on a GPU: what the kernels and cuBLAS are tuned for, and what the checkpoints are."""


@runtime_checkable
class LinearCheckpoint(Protocol):
    """What the engine reads from an artifact: its quantized linears and every other tensor, by HF name."""

    @property
    def quantized(self) -> Mapping[str, object]: ...

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]: ...


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class KernelEngine(torch.nn.Module):
    """A loaded model with its tokenizer and its own clock (a `bitsmith.runtimes.NativeEngine`).

    `scored()` counts the tokens of every forward and the seconds they took, synchronised with the GPU
    so the time is the device's, not the launch queue's.
    """

    def __init__(self, model: torch.nn.Module, path: Path, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.path = path
        self.device = device
        self._scored = Throughput(0, 0.0)
        self._decoder = StaticDecoder(model, device)

    def _timed(self, call: Callable[[], Any], tokens: int) -> tuple[Any, float]:
        self._sync()
        start = time.perf_counter()
        out = call()
        self._sync()
        seconds = time.perf_counter() - start
        self._scored += Throughput(tokens, seconds)
        return out, seconds

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def forward(self, input_ids: torch.Tensor, past_key_values: Any = None, use_cache: bool = False) -> Any:
        ids = input_ids.to(self.device)
        out, _ = self._timed(lambda: self.model(ids, past_key_values=past_key_values, use_cache=use_cache),
                             int(ids.numel()))
        return out

    @property
    def decoder(self) -> StaticDecoder:
        """The decoding state `generate` uses (its static cache and, on a GPU, its CUDA graph)."""
        return self._decoder

    def scored(self) -> Throughput:
        return self._scored

    def tokenize_file(self, file: Path) -> torch.Tensor:
        from bitsmith.evaluate import tokenize_file

        return tokenize_file(self.path, file)

    def generate(self, prompt: str, max_new_tokens: int, should_stop: Callable[[], bool],
                 interval_s: float = 0.0) -> Iterator[str | GenerationStats]:
        """Greedy decoding on a static KV cache on the device (decode steps replayed from a CUDA graph on a
        GPU: `bitsmith.decoding`); the prompt pass and each decode step timed."""
        yield from coalesce(self._pieces(prompt, max_new_tokens, should_stop), interval_s)

    def _pieces(self, prompt: str, max_new_tokens: int, should_stop: Callable[[], bool]
                ) -> Iterator[str | GenerationStats]:
        timed = _TimedDecoder(self._decoder, self._timed)
        generated = 0
        for piece in greedy_pieces(timed, self.path, prompt, max_new_tokens, should_stop, self.device):
            generated += 1
            yield piece
        yield GenerationStats(prompt=timed.prompt, decode=timed.decode, generated_tokens=generated)


class _TimedDecoder:
    """A decoder whose prompt pass and decode steps go through the engine's clock, kept apart."""

    def __init__(self, decoder: Decoder, timed: Callable[[Callable[[], Any], int], tuple[Any, float]]) -> None:
        self.decoder = decoder
        self.timed = timed
        self.prompt = Throughput(0, 0.0)
        self.decode = Throughput(0, 0.0)

    def begin(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        logits, seconds = self.timed(partial(self.decoder.begin, prompt, max_new_tokens), int(prompt.numel()))
        self.prompt = Throughput(int(prompt.numel()), seconds)
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:
        logits, seconds = self.timed(partial(self.decoder.step, token), 1)
        self.decode += Throughput(1, seconds)
        return logits


def load_kernel_model(path: Path, *, device: torch.device | str | None = None,
                      preference: KernelPreference = KernelPreference.AUTO) -> KernelEngine:
    """The artifact (or unquantized checkpoint) at `path` on `device` (default: the GPU if there is one)."""
    from bitsmith.formats import get_format
    from bitsmith.formats.base import ForeignConfig
    from bitsmith.kernels.linear import kernel_linear
    from bitsmith.models import meta_causal_lm
    from bitsmith.models.base import TensorIndex

    path = Path(path)
    target = torch.device(device) if device is not None else default_device()
    dtype = GPU_DTYPE if target.type == "cuda" else torch.float32
    fmt = artifact_format(path)
    quantized: Mapping[str, object]
    tensors: Mapping[str, torch.Tensor]
    hf_config = None
    if fmt is None:
        quantized, tensors = {}, dict(TensorIndex(path).iter_tensors())
    else:
        checkpoint = get_format(fmt).read(path)
        if not isinstance(checkpoint, LinearCheckpoint):
            raise UnsupportedError(f"{path}: a {fmt.value} artifact does not keep its quantized linears apart "
                                   "from its other tensors, which the NVIDIA engine loads separately")
        quantized, tensors = checkpoint.quantized, checkpoint.tensors
        hf_config = checkpoint.hf_config() if isinstance(checkpoint, ForeignConfig) else None
    model, config, adapter = meta_causal_lm(path, config=hf_config)
    biases = set()
    for name, weight in quantized.items():
        if not isinstance(weight, QuantizedWeight | FP8Weight):
            raise FormatError(f"{path}: {name} is a {type(weight).__name__}, which no NVIDIA kernel runs")
        parent, _, child = name.rpartition(".")
        bias = tensors.get(f"{name}.bias")
        biases.add(f"{name}.bias")
        module = kernel_linear(weight, bias, dtype=dtype, device=target, preference=preference)
        setattr(model.get_submodule(parent), child, module)
    state = {name: t.to(device=target, dtype=dtype if t.is_floating_point() else t.dtype)
             for name, t in tensors.items() if name not in biases}
    lm_head, embed = f"{adapter.lm_head}", f"{adapter.embed}"
    if getattr(config, "tie_word_embeddings", False) and lm_head not in state and embed in state:
        state[lm_head] = state[embed]
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise FormatError(f"{path}: weights do not fit the model: {exc}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise FormatError(f"{path}: weights do not match the model: missing {sorted(result.missing_keys)}, "
                          f"unexpected {sorted(result.unexpected_keys)}")
    _materialize_buffers(model, config, target, path)
    return KernelEngine(model.eval(), path, target)


def _materialize_buffers(model: torch.nn.Module, config: Any, device: torch.device, path: Path) -> None:
    """Rebuild on `device` the modules whose buffers are computed, not stored (rotary embeddings' inverse
    frequencies): on the meta device they hold nothing. Anything still on meta after that is an error."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and not any(True for _ in module.parameters()):
            parent, _, child = name.rpartition(".")
            try:
                with torch.device(device):
                    rebuilt = type(module)(config=config)
            except TypeError as exc:
                raise FormatError(f"{path}: cannot rebuild {name} ({type(module).__name__}) off the meta device: "
                                  f"{exc}") from exc
            setattr(model.get_submodule(parent) if parent else model, child, rebuilt)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise FormatError(f"{path}: no values for {left[:5]}{' ...' if len(left) > 5 else ''}")

"""Batch-1 greedy decoding state: the KV cache and the model calls that extend it, one token at a time.

Two decoders with one interface (`Decoder`): `begin` runs the prompt and returns the logits of its last
position, `step` appends one token and returns the next logits.

* `DynamicDecoder` is transformers' own convention (a cache that grows): what the torch reference
  engine runs.
* `StaticDecoder` keeps the cache at a fixed capacity, so every decode step has the same shapes and
  the same addresses. Why: a decode step of an 8B model is some 300 kernel launches of a few
  microseconds of GPU work each; launched from Python through transformers' eager forward, the CPU
  sets the pace and a 4-bit model decodes no faster than bf16, which would make the NVIDIA runtime
  measure its launcher instead of its kernels. With static shapes the step is captured once as a CUDA
  graph and replayed (as serving engines run decode), and the GPU runs at the speed of the bytes it
  reads. On a CPU the same steps run eagerly on the same cache, which is how CI checks the
  static-cache path against the dynamic one.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Protocol

import torch

from bitsmith.errors import ConfigError

log = logging.getLogger(__name__)

MIN_CAPACITY = 256
"""Smallest static cache, in tokens: capacities are powers of two from here, so a service answering
prompts of varying length rebuilds its cache (and re-captures its graph) only a few times."""


class Decoder(Protocol):
    def begin(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Forget any earlier sequence, run `prompt` [1, n] and return the last position's logits [vocab]."""
        ...

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Append `token` [1, 1] and return the logits [vocab] after it (a tensor of the caller's own, which
        no later step overwrites)."""
        ...


class DynamicDecoder:
    """transformers' growing cache: each call hands the model the cache the previous one returned."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.past: Any = None
        self._last_only = last_logits_only(model)

    def begin(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        self.past = None
        return self._run(prompt)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self._run(token)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, past_key_values=self.past, use_cache=True, **self._last_only)
        self.past = out.past_key_values
        return out.logits[0, -1]


def last_logits_only(model: torch.nn.Module) -> dict[str, int]:
    """The keyword that makes `model` compute logits for the last position only, where it takes one.

    Why: a decoder reads only the last position's logits, and a prompt pass would otherwise project every
    position onto the vocabulary (128 positions x 128k words of a Llama-3 head: a large product and 33 MB of
    bf16 output nobody reads).
    """
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def capacity_for(tokens: int) -> int:
    """The static cache size that holds `tokens`: the next power of two, at least `MIN_CAPACITY`."""
    return max(MIN_CAPACITY, 1 << max(tokens - 1, 0).bit_length())


class StaticDecoder:
    """A fixed-capacity cache whose decode step is replayed from a CUDA graph on a GPU (see the module doc).

    The decode step reads its token and position from two device buffers that never move; the graph is
    captured on the second decode step of the first sequence (the first runs eagerly, which also lets
    the kernels autotune outside the capture) and replayed from then on, across sequences, until a
    longer one needs a bigger cache.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.capacity = 0
        self.length = 0
        self.cache: Any = None
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_logits: torch.Tensor | None = None
        self.stepped_eagerly = False
        self.capture_failed = False
        self._extra: dict[str, Any] = last_logits_only(model)
        self._takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters

    @property
    def uses_graph(self) -> bool:
        return self.device.type == "cuda" and not self.capture_failed

    def begin(self, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        from transformers import StaticCache

        needed = int(prompt.shape[1]) + max_new_tokens
        if needed > self.capacity:
            self.capacity = capacity_for(needed)
            config: Any = self.model.config
            self.cache = StaticCache(config=config, max_cache_len=self.capacity)
            self.graph, self.graph_logits, self.stepped_eagerly = None, None, False
        else:
            self.cache.reset()
        self.length = 0
        positions = torch.arange(prompt.shape[1], device=self.device).unsqueeze(0)
        logits = self._forward(prompt, positions)
        self.length = int(prompt.shape[1])
        return logits[0, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise ConfigError("a static decoder steps only after begin()")
        if self.length >= self.capacity:
            raise ConfigError(f"the static cache holds {self.capacity} tokens; begin() was told fewer new tokens "
                              "than are being decoded")
        self.token.copy_(token)
        self.position.fill_(self.length)
        if self.graph is None and self.uses_graph and self.stepped_eagerly:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            assert self.graph_logits is not None
            # A copy: the graph's output buffer is overwritten by the next replay, and a caller that keeps
            # the logits of several steps would otherwise see the last step's in all of them.
            logits = self.graph_logits.clone()
        else:
            logits = self._forward(self.token, self.position)
            self.stepped_eagerly = True
        self.length += 1
        return logits[0, -1]

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        extra = {**self._extra, "cache_position": positions[0]} if self._takes_cache_position else self._extra
        out = self.model(ids, past_key_values=self.cache, position_ids=positions, use_cache=True, **extra)
        return out.logits

    def _capture(self) -> None:
        """Record one decode step (it is not executed: the replay that follows runs it).

        A model whose forward cannot be captured (a host synchronisation inside, say) keeps decoding
        eagerly — slower, still right — and says so in the log once.
        """
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = self._forward(self.token, self.position)
        except RuntimeError as exc:
            self.capture_failed = True
            log.warning("decode step cannot be captured as a CUDA graph; decoding eagerly",
                        extra={"model": type(self.model).__name__, "error": str(exc)})
            return
        self.graph, self.graph_logits = graph, logits
        log.info("decode step captured as a CUDA graph", extra={"capacity": self.capacity})

"""Run one block with forward hooks on chosen linears, handing their inputs to sinks (Hessians, any statistic).

This is the only place hooks live: algorithms get plain tensors. Samples go through the block in
chunks so activation memory stays bounded whatever the calibration set size: the whole set may stay
on the host while the model computes on a GPU, each chunk crossing to the device and its result back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bitsmith.calib.stats import HessianAccumulator, InputStats
from bitsmith.errors import CalibrationError, ConfigError
from bitsmith.models.base import CheckpointModel

DEFAULT_CHUNK = 16
DEVICE_CHUNK_BYTES = 4 << 30
"""What one chunk's largest transients may take on a GPU: attention scores in float32 (heads x L x L
per sample; the float32 attention runs the unfused path) and the MLP's hidden activations."""


def default_chunk(model: CheckpointModel, seq_len: int) -> int:
    """Samples per chunk: `DEFAULT_CHUNK`, fewer on a GPU when a wide model's transients would pass
    `DEVICE_CHUNK_BYTES` (a 70B-shaped block at 2048 tokens: 4 samples, whose scores alone take 4 GiB)."""
    if model.device.type != "cuda":
        return DEFAULT_CHUNK
    config = model.config
    per_sample = 4 * seq_len * max(config.num_attention_heads * seq_len, 3 * config.intermediate_size)
    return max(1, min(DEFAULT_CHUNK, DEVICE_CHUNK_BYTES // per_sample))


def chunks(total: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(total)."""
    if size <= 0:
        raise ConfigError(f"chunk size must be positive, got {size}")
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def forward_block(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Block `bid`'s output for all samples, computed `chunk` samples at a time, on the inputs' device.

    Host inputs give host outputs (page-locked when the model computes on a GPU, for fast copies):
    the device holds one chunk's activations, never the set's. Outputs are in the model's compute dtype,
    written chunk by chunk into one tensor: concatenating the chunks' outputs would hold the set twice.
    """
    parts = chunks(len(inputs), chunk if chunk is not None else default_chunk(model, inputs.shape[1]))
    pin = inputs.device.type == "cpu" and model.device.type == "cuda"
    out = torch.empty(inputs.shape, dtype=model.compute_dtype, device=inputs.device, pin_memory=pin)
    for part in parts:
        out[part].copy_(model.block_forward(bid, inputs[part], overrides))
    return out


class _AllInputsSeen(Exception):
    """Raised from the last hook of a chunk to skip the rest of the block's forward."""


InputSink = Callable[[slice, torch.Tensor], None]
"""Receives the slice of samples a chunk covers and a linear's input for them, [B, L, K]."""


def run_with_input_hooks(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    sinks: Mapping[str, InputSink],
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    chunk: int | None = None,
) -> None:
    """Run block `bid` over `inputs` [S, L, H], `chunk` samples at a time, handing each hooked linear's input
    to its sink (block-local linear name -> sink); the hooks are removed whatever happens.

    Each chunk's forward stops as soon as every hooked linear has seen its input: nothing after that
    point reaches a sink, and skipping it makes capturing q/k/v (first in the block) nearly free.
    """
    layer = model.block_module(bid)
    handles = []
    current = slice(0, 0)
    pending: set[str] = set()

    def hook_for(name: str, sink: InputSink) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            sink(current, args[0])
            pending.discard(name)
            if not pending:
                raise _AllInputsSeen

        return hook

    try:
        for name, sink in sinks.items():
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, torch.nn.Linear):
                raise ConfigError(f"{model.full_name(bid, name)} is not a linear layer")
            handles.append(module.register_forward_pre_hook(hook_for(name, sink)))
        for part in chunks(len(inputs), chunk if chunk is not None else default_chunk(model, inputs.shape[1])):
            current = part
            pending.update(sinks)
            try:
                model.block_forward(bid, inputs[part], overrides)
            except _AllInputsSeen:
                continue
            if pending:
                raise CalibrationError(f"block {bid}: linears {sorted(pending)} did not run in the block's forward")
    finally:
        for handle in handles:
            handle.remove()


def capture_hessians(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    names: Sequence[str],
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    reference: tuple[torch.Tensor, Mapping[str, torch.Tensor]] | None = None,
    chunk: int | None = None,
) -> dict[str, InputStats]:
    """Hessian, token count and absmax of the input of each linear in `names` while block `bid` runs `inputs`.

    `overrides` (block-local parameter name -> value) lets earlier groups' quantized weights shape the
    activations that later groups see (true-sequential quantization). `reference` — the float model's
    inputs to the block (same rows) and its overrides — adds asymmetric calibration's cross statistics
    (`InputStats.cross`): the two streams run a chunk at a time in step, so one chunk of the float
    model's activations is held at a time.
    """
    accumulators = {
        name: HessianAccumulator(model.linear_shape(bid, name)[1], device=model.device, name=model.full_name(bid, name),
                                 cross=reference is not None)
        for name in names
    }
    if reference is None:
        def sink_for(acc: HessianAccumulator) -> InputSink:
            def sink(_part: slice, x: torch.Tensor) -> None:
                acc.add(x)

            return sink

        run_with_input_hooks(
            model, bid, inputs, {name: sink_for(acc) for name, acc in accumulators.items()}, overrides, chunk=chunk
        )
        return {name: acc.stats() for name, acc in accumulators.items()}

    float_inputs, float_overrides = reference
    if float_inputs.shape != inputs.shape:
        raise ConfigError(f"block {bid}: the float model's inputs have shape {tuple(float_inputs.shape)}, "
                          f"the quantized stream's {tuple(inputs.shape)}")
    seen: dict[str, torch.Tensor] = {}  # the current chunk's float inputs, by linear

    def keep(name: str) -> InputSink:
        def sink(_part: slice, x: torch.Tensor) -> None:
            seen[name] = x

        return sink

    def pair(name: str) -> InputSink:
        def sink(_part: slice, x: torch.Tensor) -> None:
            accumulators[name].add(x, seen.pop(name))

        return sink

    size = chunk if chunk is not None else default_chunk(model, inputs.shape[1])
    keeps, pairs = {n: keep(n) for n in accumulators}, {n: pair(n) for n in accumulators}
    for part in chunks(len(inputs), size):
        run_with_input_hooks(model, bid, float_inputs[part], keeps, float_overrides, chunk=size)
        run_with_input_hooks(model, bid, inputs[part], pairs, overrides, chunk=size)
    return {name: acc.stats() for name, acc in accumulators.items()}

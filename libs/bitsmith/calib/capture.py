"""Run one block with forward hooks on chosen linears, handing their inputs to sinks (Hessians, any statistic).

This is the only place hooks live: algorithms get plain tensors. Samples go through the block in
chunks so activation memory stays bounded whatever the calibration set size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from bitsmith.calib.stats import HessianAccumulator
from bitsmith.errors import ConfigError
from bitsmith.models.base import CheckpointModel

DEFAULT_CHUNK = 16


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
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Block `bid`'s output for all samples, computed `chunk` samples at a time."""
    return torch.cat([model.block_forward(bid, inputs[part], overrides) for part in chunks(len(inputs), chunk)])


InputSink = Callable[[slice, torch.Tensor], None]
"""Receives the slice of samples a chunk covers and a linear's input for them, [B, L, K]."""


def run_with_input_hooks(
    model: CheckpointModel,
    bid: int,
    inputs: torch.Tensor,
    sinks: Mapping[str, InputSink],
    overrides: Mapping[str, torch.Tensor] | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
) -> None:
    """Run block `bid` over `inputs` [S, L, H], `chunk` samples at a time, handing each hooked linear's input
    to its sink (block-local linear name -> sink); the hooks are removed whatever happens."""
    layer = model.block_module(bid)
    handles = []
    current = slice(0, 0)

    def hook_for(sink: InputSink) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            sink(current, args[0])

        return hook

    try:
        for name, sink in sinks.items():
            try:
                module = layer.get_submodule(name)
            except AttributeError:
                module = None
            if not isinstance(module, torch.nn.Linear):
                raise ConfigError(f"{model.full_name(bid, name)} is not a linear layer")
            handles.append(module.register_forward_pre_hook(hook_for(sink)))
        for part in chunks(len(inputs), chunk):
            current = part
            model.block_forward(bid, inputs[part], overrides)
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
    chunk: int = DEFAULT_CHUNK,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Hessian and token count of the input of each linear in `names` while block `bid` runs `inputs`.

    `overrides` (block-local parameter name -> value) lets earlier groups' quantized weights shape the
    activations that later groups see (true-sequential quantization).
    """
    accumulators = {
        name: HessianAccumulator(model.linear_shape(bid, name)[1], device=model.device, name=model.full_name(bid, name))
        for name in names
    }

    def sink_for(acc: HessianAccumulator) -> InputSink:
        def sink(_part: slice, x: torch.Tensor) -> None:
            acc.add(x)

        return sink

    run_with_input_hooks(
        model, bid, inputs, {name: sink_for(acc) for name, acc in accumulators.items()}, overrides, chunk=chunk
    )
    return {name: (acc.hessian(), acc.count) for name, acc in accumulators.items()}

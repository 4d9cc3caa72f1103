"""The block loop that quantizes a model, written once over an abstract backend.

The same `run_sequential` drives the in-process path (`LocalBackend`, tensors in memory) and the
distributed coordinator (a backend whose handles are references into the artifact store and whose
steps are gRPC calls). The loop knows the order of work, not where tensors live or which method runs:

* no calibration (RTN): per block, one `collect` with no inputs, then `solve` each group;
* calibration, true-sequential: per group, `collect` with the groups already quantized in this block
  applied, `solve`, apply;
* calibration, not true-sequential: one `collect` for the whole block, then `solve` each group;
* after a calibrated block, `advance` with all its quantized linears applied, so block i+1 calibrates
  on the outputs of the *quantized* block i (sequential mode).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch

from bitsmith.algos import GPTQResult, get_method, split_rows
from bitsmith.calib.capture import capture_hessians, forward_block
from bitsmith.calib.data import calibration_tokens
from bitsmith.errors import CancelledError
from bitsmith.models.base import CheckpointModel, load_checkpoint
from bitsmith.quantized import QuantizedWeight
from bitsmith.schemes import GPTQOptions, Method, QuantScheme

A = TypeVar("A")
S = TypeVar("S")
Q = TypeVar("Q")


class Backend(Protocol[A, S, Q]):
    """Where activations (A), statistics (S) and quantized weights (Q) live; handles are opaque."""

    def start(self) -> A | None:
        """Block-0 inputs, or None when the method needs no calibration."""
        ...

    def collect(self, bid: int, names: Sequence[str], inputs: A | None, applied: Mapping[str, Q]) -> S:
        """Statistics for `names` of block `bid`, with the `applied` quantized linears in place."""
        ...

    def solve(self, bid: int, names: Sequence[str], stats: S) -> Mapping[str, Q]:
        """Quantize the linears `names` (one group) of block `bid`; keys are block-local names."""
        ...

    def advance(self, bid: int, inputs: A, applied: Mapping[str, Q]) -> A:
        """Block `bid`'s outputs (the next block's inputs) with `applied` in place."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Blocks and, per block, its linears grouped by shared input in true-sequential order.

    `block_prefix` turns a block-local name into the model-wide one (``{bid}`` is the block index).
    """

    num_blocks: int
    groups: list[list[list[str]]]
    block_prefix: str = "model.layers.{bid}"

    @classmethod
    def from_model(cls, model: CheckpointModel) -> Plan:
        return cls(
            num_blocks=model.num_blocks,
            groups=[model.groups(bid) for bid in range(model.num_blocks)],
            block_prefix=model.adapter.block_prefix,
        )

    def full_name(self, bid: int, local: str) -> str:
        """``model.layers.3.self_attn.q_proj`` for block 3's ``self_attn.q_proj``."""
        return f"{self.block_prefix.format(bid=bid)}.{local}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """One step of the loop; `group` is -1 for block-wide steps."""

    phase: str
    block: int
    num_blocks: int
    group: int
    names: tuple[str, ...]
    message: str = ""


def run_sequential(
    plan: Plan,
    backend: Backend[A, S, Q],
    *,
    needs_calibration: bool,
    true_sequential: bool,
    on_event: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Q]:
    """Quantize every linear of `plan` through `backend`; results keyed by full linear name."""

    def step(phase: str, bid: int, group: int, names: Sequence[str], message: str = "") -> None:
        if should_stop is not None and should_stop():
            raise CancelledError(f"cancelled before {phase} of block {bid} group {group}")
        if on_event is not None:
            on_event(
                ProgressEvent(
                    phase=phase,
                    block=bid,
                    num_blocks=plan.num_blocks,
                    group=group,
                    names=tuple(names),
                    message=message,
                )
            )

    results: dict[str, Q] = {}
    inputs = backend.start() if needs_calibration else None
    for bid in range(plan.num_blocks):
        groups = plan.groups[bid]
        every = [name for group in groups for name in group]
        applied: dict[str, Q] = {}
        stats = None
        if not (needs_calibration and true_sequential):
            step("calibrate", bid, -1, every)
            stats = backend.collect(bid, every, inputs, applied)
        for index, names in enumerate(groups):
            if needs_calibration and true_sequential:
                step("calibrate", bid, index, names)
                stats = backend.collect(bid, names, inputs, applied)
            step("solve", bid, index, names)
            applied.update(backend.solve(bid, names, stats))  # type: ignore[arg-type]
        results.update({plan.full_name(bid, name): applied[name] for name in every})
        if inputs is not None:
            step("advance", bid, -1, every)
            inputs = backend.advance(bid, inputs, applied)
        step("done", bid, -1, every, f"block {bid + 1}/{plan.num_blocks} quantized")
    return results


Stats = dict[str, tuple[torch.Tensor, int]] | None


def collect_stats(
    model: CheckpointModel,
    bid: int,
    names: Sequence[str],
    inputs: torch.Tensor,
    overrides: Mapping[str, torch.Tensor],
) -> dict[str, tuple[torch.Tensor, int]]:
    """Hessians of the inputs of `names` in block `bid`; linears sharing an input share one tensor.

    Each shared input is captured once (on its group's first member), so q/k/v cost one
    accumulation, and callers can recognise the shared Hessian by identity.
    """
    first_of = {name: group[0] for group in model.groups(bid) for name in group}
    captured = sorted({first_of[name] for name in names})
    hessians = capture_hessians(model, bid, inputs, captured, overrides)
    return {name: hessians[first_of[name]] for name in names}


def solve_group(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor | None,
    *,
    method: Method,
    scheme: QuantScheme,
    options: GPTQOptions,
    label: str,
) -> list[GPTQResult]:
    """Solve linears that share one input as one problem (one factorization, rows concatenated).

    Rows are independent given H, so this is exactly the per-linear solve, done once.
    """
    result = get_method(method).solve(torch.cat(list(weights)), hessian, scheme, options, label)
    return split_rows(result, [w.shape[0] for w in weights])


class LocalBackend:
    """Everything in this process: activations, Hessians and quantized weights as tensors.

    `results` keeps each linear's solve report (damping used, errors) by full name.
    """

    def __init__(
        self,
        model: CheckpointModel,
        *,
        scheme: QuantScheme,
        method: Method,
        options: GPTQOptions,
        tokens: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.scheme = scheme
        self.options = options
        self.method = method
        self.tokens = tokens
        self.results: dict[str, GPTQResult] = {}

    def start(self) -> torch.Tensor | None:
        return None if self.tokens is None else self.model.embed(self.tokens)

    def collect(
        self,
        bid: int,
        names: Sequence[str],
        inputs: torch.Tensor | None,
        applied: Mapping[str, QuantizedWeight],
    ) -> Stats:
        if inputs is None:
            return None
        return collect_stats(self.model, bid, names, inputs, self._dense(applied))

    def solve(self, bid: int, names: Sequence[str], stats: Stats) -> dict[str, QuantizedWeight]:
        weights = [self.model.linear_weight(bid, name) for name in names]
        hessian = None if stats is None else stats[names[0]][0]
        label = ",".join(self.model.full_name(bid, name) for name in names)
        parts = solve_group(weights, hessian, method=self.method, scheme=self.scheme, options=self.options,
                            label=label)
        for name, part in zip(names, parts, strict=True):
            self.results[self.model.full_name(bid, name)] = part
        return {name: part.weight for name, part in zip(names, parts, strict=True)}

    def advance(self, bid: int, inputs: torch.Tensor, applied: Mapping[str, QuantizedWeight]) -> torch.Tensor:
        return forward_block(self.model, bid, inputs, self._dense(applied))

    @staticmethod
    def _dense(applied: Mapping[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": qw.dequantize() for name, qw in applied.items()}


def quantize_in_process(
    model_dir: str | Path,
    *,
    calib_files: Sequence[Path],
    samples: int,
    seq_len: int,
    scheme: QuantScheme,
    method: Method,
    options: GPTQOptions,
    seed: int = 0,
    device: str = "cpu",
    on_event: Callable[[ProgressEvent], None] | None = None,
) -> dict[str, QuantizedWeight]:
    """Quantize a checkpoint in this process; returns every block linear by full name.

    >>> from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    >>> out = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=2, seq_len=32,
    ...     scheme=QuantScheme(bits=4), method=Method.RTN, options=GPTQOptions())
    >>> len(out), out["model.layers.0.self_attn.q_proj"].shape
    (28, (256, 256))
    """
    model = load_checkpoint(model_dir, device=device)
    spec = get_method(method)
    tokens = (
        calibration_tokens(model_dir, calib_files, samples=samples, seq_len=seq_len, seed=seed)
        if spec.needs_calibration
        else None
    )
    backend = LocalBackend(model, scheme=scheme, method=method, options=options, tokens=tokens)
    return run_sequential(
        Plan.from_model(model),
        backend,
        needs_calibration=spec.needs_calibration,
        true_sequential=options.true_sequential,
        on_event=on_event,
    )

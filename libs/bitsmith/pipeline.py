"""The block loop that quantizes a model, written once over an abstract backend.

The same `run_sequential` drives the in-process path (`LocalBackend`, tensors in memory) and the
distributed coordinator (a backend whose handles are references into the artifact store and whose
steps are gRPC calls). The loop knows the order of work, not where tensors live or how a method runs.
The recipe decides per linear (`Plan.units`): linears sharing an input are solved as one problem
when they share a method and scheme, skipped linears are never solved, and per block:

* AWQ (any linear of the block assigned an AWQ method): first `scale`, which returns the block's
  rescaled parameters; every later step of the block sees them, and the changed tensors that are not
  replaced by codes (norms, biases, linears kept in float) become the result's `dense` tensors;
* no calibration (RTN only): one `collect` with no inputs, then `solve` each unit;
* calibration, true-sequential: per input group, `collect` with the units already quantized in this
  block applied, then `solve` its units;
* calibration, not true-sequential: one `collect` for the whole block, then `solve` each unit;
* after a calibrated block, `advance` with all its quantized linears applied, so block i+1 calibrates
  on the outputs of the *quantized* block i (sequential mode);
* parallel mode takes every statistic from the *unquantized* model: one `collect` per block with
  nothing applied (true-sequential does not apply), and `advance` runs the float block, so no
  calibration step waits on a solve;
* once every solve of a calibrated block is done, `finish`: the backend may drop the block's
  statistics, and in parallel mode measures the block's output error with its quantized linears.

Solves are independent given their statistics, so `run_sequential(..., concurrency=n)` runs up to n
at once on a thread pool while the loop goes on calibrating; it waits only where data forces it.
Sequential mode waits for a group's primary solves before the next group's `collect` (true-sequential)
and for all of them before `advance`; parallel mode never waits inside a block. Extra targets' solves
are never waited for until their block is finished, and calibration runs at most `concurrency` blocks
ahead of the oldest unfinished block, whose statistics the backend still holds.

A plan may carry `extra` targets: further recipes (a GGUF mix's ggml grids beside the integer grid
of the other formats) solved on the same statistics, so several artifacts cost one calibration. The
primary recipe alone decides what is applied when the loop moves on; each extra target's results
come back under its key.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch

from bitsmith.algos import GPTQResult, get_method, split_rows
from bitsmith.algos.gptq import asymmetric_target
from bitsmith.calib.capture import capture_hessians, forward_block
from bitsmith.calib.data import calibration_tokens
from bitsmith.calib.stats import InputStats
from bitsmith.errors import CancelledError, ConfigError
from bitsmith.models.base import CheckpointModel, load_checkpoint
from bitsmith.quantized import Quantized
from bitsmith.recipes import Assignment, Recipe
from bitsmith.schemes import GPTQOptions, Method, QuantScheme, Scheme

Solved = Quantized
"""A linear as any method returns it: on an integer grid or on ggml blocks."""

A = TypeVar("A")
S = TypeVar("S")
Q = TypeVar("Q")
D = TypeVar("D")


class Backend(Protocol[A, S, Q, D]):
    """Where activations (A), statistics (S), quantized weights (Q) and dense tensors (D) live.

    Handles are opaque to the loop. `scaled` maps block-local parameter names to AWQ's replacements
    (empty for other methods); `applied` maps block-local linear names to their quantized weights.
    """

    def start(self) -> A | None:
        """Block-0 inputs, or None when the method needs no calibration."""
        ...

    def scale(self, bid: int, inputs: A, targets: Mapping[str, QuantScheme], clip: frozenset[str]
              ) -> Mapping[str, D]:
        """AWQ's replacements for block `bid`, searched for the `targets` linears and their schemes; the
        clipping search runs for the `clip` ones (see `Plan.clip_targets`)."""
        ...

    def collect(self, bid: int, names: Sequence[str], inputs: A | None, applied: Mapping[str, Q],
                scaled: Mapping[str, D]) -> S:
        """Statistics for `names` of block `bid`, with `scaled` and the `applied` quantized linears in place."""
        ...

    def solve(self, bid: int, names: Sequence[str], assignment: Assignment, stats: S,
              scaled: Mapping[str, D], *, target: str = "") -> Mapping[str, Q]:
        """Quantize the linears `names` (one unit) of block `bid` for `target` ("" for the primary
        recipe, else an extra target's key); keys are block-local names."""
        ...

    def advance(self, bid: int, inputs: A, applied: Mapping[str, Q], scaled: Mapping[str, D], *,
                float_outputs: bool) -> A:
        """Block `bid`'s outputs (the next block's inputs) with `scaled` and `applied` in place, or the
        float block's outputs when `float_outputs` (parallel mode: `applied` is there to be measured,
        not propagated)."""
        ...

    def finish(self, bid: int, applied: Mapping[str, Q], scaled: Mapping[str, D], *, measure: bool) -> None:
        """Every solve of block `bid` (all targets) is done: the backend may drop its statistics; with
        `measure` (parallel mode, where `advance` ran the float block before the solves ended) it
        measures the block's held-out output error with `applied` (the primary recipe's linears).

        Called once per calibrated block, in block order, from the loop's thread."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Unit:
    """Linears solved as one problem: they share an input, a method and a scheme."""

    names: tuple[str, ...]
    assignment: Assignment


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Blocks and, per block, its linears grouped by shared input in true-sequential order, and the
    recipe that assigns each linear its method and scheme.

    `block_prefix` turns a block-local name into the model-wide one (``{bid}`` is the block index);
    `parallel` selects parallel calibration (statistics from the unquantized model, one `collect` per
    block: the recipe's true-sequential is ignored there).
    """

    num_blocks: int
    groups: list[list[list[str]]]
    recipe: Recipe = field(default_factory=Recipe)
    block_prefix: str = "model.layers.{bid}"
    parallel: bool = False
    extra: tuple[tuple[str, Recipe], ...] = ()
    """Further targets solved on the same statistics, by key (e.g. ``gguf:Q4_K_M``)."""

    @classmethod
    def from_model(cls, model: CheckpointModel, recipe: Recipe, *, parallel: bool = False,
                   extra: Sequence[tuple[str, Recipe]] = ()) -> Plan:
        return cls(
            num_blocks=model.num_blocks,
            groups=[model.groups(bid) for bid in range(model.num_blocks)],
            recipe=recipe,
            block_prefix=model.adapter.block_prefix,
            parallel=parallel,
            extra=tuple(extra),
        )

    @property
    def recipes(self) -> list[Recipe]:
        """The primary recipe, then the extra targets'."""
        return [self.recipe, *(recipe for _, recipe in self.extra)]

    def full_name(self, bid: int, local: str) -> str:
        """``model.layers.3.self_attn.q_proj`` for block 3's ``self_attn.q_proj``."""
        return f"{self.block_prefix.format(bid=bid)}.{local}"

    def units(self, bid: int, recipe: Recipe | None = None) -> list[list[Unit]]:
        """Per input group, its units in order of first appearance; skipped linears are left out.

        `recipe` is one of `recipes` (default: the primary one)."""
        recipe = recipe or self.recipe
        out = []
        for group in self.groups[bid]:
            by_assignment: dict[Assignment, list[str]] = {}
            for name in group:
                assignment = recipe.assign(self.full_name(bid, name))
                if assignment is not None:
                    by_assignment.setdefault(assignment, []).append(name)
            out.append([Unit(names=tuple(names), assignment=a) for a, names in by_assignment.items()])
        return out

    def scale_targets(self, bid: int) -> dict[str, QuantScheme]:
        """The linears of block `bid` whose method rescales the block (AWQ), with their schemes
        (the primary recipe's: AWQ's rescaling is one per block, shared by every target; its search
        runs on integer grids, which `check_recipe` enforces)."""
        return {name: unit.assignment.scheme for group in self.units(bid) for unit in group
                if unit.assignment.method.scales_activations and isinstance(unit.assignment.scheme, QuantScheme)
                for name in unit.names}

    def clip_targets(self, bid: int) -> frozenset[str]:
        """The scaled linears of block `bid` whose clipping range AWQ searches: those rounded to nearest
        afterwards (`awq`), when the recipe's AWQ options clip at all. Not those GPTQ solves (`awq+gptq`):
        a clip is chosen for rounding the weight as it is, GPTQ's error feedback moves the weights as it
        goes, and its own grid (with a grid search) fits each group's range; on the demo model clipping
        first took w4 awq+gptq with `--mse` from 0.25 / 0.50 of RTN's perplexity increase to 0.41 / 0.59."""
        if not self.recipe.awq.clip:
            return frozenset()
        return frozenset(name for group in self.units(bid) for unit in group
                         if unit.assignment.method is Method.AWQ for name in unit.names)

    @property
    def needs_calibration(self) -> bool:
        """Whether any linear's method needs calibration data."""
        return any(unit.assignment.needs_calibration for recipe in self.recipes
                   for bid in range(self.num_blocks) for group in self.units(bid, recipe) for unit in group)

    @property
    def cross_statistics(self) -> bool:
        """Whether calibration runs the float model's stream beside the quantized one (asymmetric
        calibration, `GPTQOptions.asymmetric_calibration`): in sequential mode, when the primary target solves a
        linear by a method that fits outputs. Extra targets are solved on the primary's statistics
        without them (see `LocalBackend`)."""
        return (self.recipe.gptq.asymmetric_calibration and not self.parallel
                and any(get_method(unit.assignment.method).fits_outputs for bid in range(self.num_blocks)
                        for group in self.units(bid) for unit in group))

    @property
    def solve_steps(self) -> int:
        """How many `solve` calls the loop makes (one per unit of every target)."""
        return sum(len(group) for recipe in self.recipes
                   for bid in range(self.num_blocks) for group in self.units(bid, recipe))


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """One step of the loop; `group` is -1 for block-wide steps."""

    phase: str
    block: int
    num_blocks: int
    group: int
    names: tuple[str, ...]
    message: str = ""


@dataclass(frozen=True, slots=True)
class QuantizedModel(Generic[Q, D]):
    """What a run produces, by full name: quantized linears, and float tensors that replace the
    checkpoint's (AWQ's folded norms and rescaled biases, rescaled linears kept in float); `extra`
    holds each extra target's quantized linears under its key."""

    quantized: dict[str, Q]
    dense: dict[str, D]
    extra: dict[str, dict[str, Q]] = field(default_factory=dict)


def check_recipe(model: CheckpointModel, recipe: Recipe) -> None:
    """Refuse, before any work, a recipe that cannot apply to `model`: one that skips every linear,
    a scheme whose group size does not divide the linear it is assigned to, or AWQ on a ggml grid
    (its search rounds on integer grids) — naming the linear."""
    names = {model.full_name(bid, local): (bid, local)
             for bid in range(model.num_blocks) for group in model.groups(bid) for local in group}
    for full, assignment in recipe.assignments(names).items():
        if assignment is None:
            continue
        if assignment.method.scales_activations and not isinstance(assignment.scheme, QuantScheme):
            raise ConfigError(f"{full}: {assignment.method.value} searches integer grids and cannot target "
                              f"{assignment.scheme.label}; use rtn or gptq for GGUF")
        try:
            assignment.scheme.groups(model.linear_shape(*names[full])[1])
        except ConfigError as exc:
            raise ConfigError(f"{full}: {exc}") from None


def run_sequential(
    plan: Plan,
    backend: Backend[A, S, Q, D],
    *,
    on_event: Callable[[ProgressEvent], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    concurrency: int = 1,
) -> QuantizedModel[Q, D]:
    """Quantize every assigned linear of `plan` through `backend`.

    `concurrency` is how many `solve` calls may run at once. With 1 every step runs in this thread,
    in order. With more, solves run on a thread pool (each in a copy of the caller's context, so
    tracing follows them): a solve needs only its unit's statistics, and the loop waits for solves
    only where their results are inputs: sequential mode waits for the primary recipe's solves of a
    group before the next group's `collect` (true-sequential) and for all of the block's before
    `advance`; parallel mode (statistics from the float model, one `collect` per block whatever
    true-sequential says) waits for none, and extra targets' solves are never waited for. Before
    block b is calibrated, every block before b - `concurrency` is finished, which bounds the
    statistics held for unfinished blocks. `backend.finish` runs in block order, from this thread,
    once all of a block's solves are done. Events come from this thread, as each step starts or is
    submitted; a failed solve is raised at the next wait or block boundary, after the solves not
    yet started are cancelled and the running ones have returned. The result does not depend on
    `concurrency`.
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {concurrency}")

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

    def retire(before: int) -> None:
        """Finish, in block order, the blocks before `before` (waiting for their solves) and then those
        whose solves are all done; their results go into `result`."""
        solves.check()
        while solves.blocks and (solves.blocks[0].bid < before or solves.blocks[0].done):
            block = solves.blocks[0]
            applied = solves.applied(block)
            solves.wait([future for _, _, future in block.extra])
            solves.blocks.popleft()
            result.quantized.update({plan.full_name(block.bid, name): applied[name] for name in block.every})
            for key, unit, future in block.extra:
                solved = future.result()
                result.extra[key].update({plan.full_name(block.bid, name): solved[name] for name in unit.names})
            if block.calibrated:
                backend.finish(block.bid, applied, block.scaled, measure=plan.parallel)

    calibrate = plan.needs_calibration
    per_group = calibrate and plan.recipe.gptq.true_sequential and not plan.parallel
    result: QuantizedModel[Q, D] = QuantizedModel({}, {}, {key: {} for key, _ in plan.extra})
    solves: _Solves[Q, D] = _Solves(concurrency, should_stop)
    try:
        inputs = backend.start() if calibrate else None
        for bid in range(plan.num_blocks):
            retire(bid - concurrency)
            units = plan.units(bid)
            extra = [(key, plan.units(bid, recipe)) for key, recipe in plan.extra]
            every = [name for group in units for unit in group for name in unit.names]
            wanted = _in_group_order(plan.groups[bid], [units, *(u for _, u in extra)])
            scaled: Mapping[str, D] = {}
            if targets := plan.scale_targets(bid):
                step("scale", bid, -1, list(targets))
                scaled = backend.scale(bid, inputs, targets,  # type: ignore[arg-type]  # AWQ implies calibration
                                       plan.clip_targets(bid))
                result.dense.update({plan.full_name(bid, param): value for param, value in scaled.items()
                                     if param.removesuffix(".weight") not in every})
            block: _Block[Q, D] = _Block(bid=bid, every=every, scaled=scaled, calibrated=inputs is not None)
            solves.blocks.append(block)
            stats = None
            if not per_group and (names := [n for group in wanted for n in group]):
                step("calibrate", bid, -1, names)
                stats = backend.collect(bid, names, inputs, {}, scaled)
            for index, names in enumerate(wanted):
                if names and per_group:
                    applied = solves.applied(block)
                    step("calibrate", bid, index, names)
                    stats = backend.collect(bid, names, inputs, applied, scaled)
                for unit in units[index]:
                    step("solve", bid, index, unit.names)
                    solve = partial(backend.solve, bid, unit.names, unit.assignment, stats, scaled)  # type: ignore[arg-type]
                    block.primary.append(solves.submit(solve))
                for key, target_units in extra:
                    for unit in target_units[index]:
                        step("solve", bid, index, unit.names, key)
                        solve = partial(backend.solve, bid, unit.names, unit.assignment, stats, scaled,  # type: ignore[arg-type]
                                        target=key)
                        block.extra.append((key, unit, solves.submit(solve)))
            if inputs is not None:
                applied = {} if plan.parallel else solves.applied(block)
                step("advance", bid, -1, every)
                inputs = backend.advance(bid, inputs, applied, scaled, float_outputs=plan.parallel)
            retire(0)
            step("done", bid, -1, every, f"block {bid + 1}/{plan.num_blocks} quantized")
        retire(plan.num_blocks)
    finally:
        solves.close()
    return result


@dataclass(slots=True, kw_only=True)
class _Block(Generic[Q, D]):
    """One block's submitted solves, in submission order, until it is finished."""

    bid: int
    every: list[str]
    scaled: Mapping[str, D]
    calibrated: bool
    primary: list[Future[Mapping[str, Q]]] = field(default_factory=list)
    extra: list[tuple[str, Unit, Future[Mapping[str, Q]]]] = field(default_factory=list)

    def futures(self) -> Iterable[Future[Mapping[str, Q]]]:
        yield from self.primary
        yield from (future for _, _, future in self.extra)

    @property
    def done(self) -> bool:
        return all(future.done() for future in self.futures())


class _Solves(Generic[Q, D]):
    """The solves of unfinished blocks: run inline (`concurrency` 1) or on a pool of that many threads."""

    POLL_S = 0.1
    """How often a wait for solves looks at `should_stop`."""

    def __init__(self, concurrency: int, should_stop: Callable[[], bool] | None) -> None:
        self.blocks: deque[_Block[Q, D]] = deque()
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="solve") if concurrency > 1 else None
        self._should_stop = should_stop

    def submit(self, solve: Callable[[], Mapping[str, Q]]) -> Future[Mapping[str, Q]]:
        if self._pool is not None:
            return self._pool.submit(contextvars.copy_context().run, solve)
        future: Future[Mapping[str, Q]] = Future()
        future.set_result(solve())
        return future

    def check(self) -> None:
        """Raise the error of the first failed solve (in submission order) of any unfinished block."""
        for block in self.blocks:
            for future in block.futures():
                if future.done() and (error := future.exception()) is not None:
                    raise error

    def wait(self, futures: Iterable[Future[Mapping[str, Q]]]) -> None:
        """Until `futures` are done, raising any solve's failure as soon as it is seen."""
        waiting = [future for future in futures if not future.done()]
        while True:
            self.check()
            waiting = [future for future in waiting if not future.done()]
            if not waiting:
                return
            if self._should_stop is not None and self._should_stop():
                raise CancelledError("cancelled while solves were running")
            running = {future for block in self.blocks for future in block.futures() if not future.done()}
            wait_futures(running.union(waiting), timeout=self.POLL_S, return_when=FIRST_COMPLETED)

    def applied(self, block: _Block[Q, D]) -> dict[str, Q]:
        """The primary recipe's linears of `block` solved so far, waiting for those submitted."""
        self.wait(block.primary)
        return {name: q for future in block.primary for name, q in future.result().items()}

    def close(self) -> None:
        """Cancel the solves not started and wait for the running ones."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _in_group_order(groups: Sequence[Sequence[str]], targets: Sequence[Sequence[Sequence[Unit]]]) -> list[list[str]]:
    """Per input group, the linears any target solves, in the group's own order (one capture serves all)."""
    return [[name for name in group if any(name in unit.names for units in targets for unit in units[index])]
            for index, group in enumerate(groups)]


Stats = dict[str, InputStats] | None


def collect_stats(
    model: CheckpointModel,
    bid: int,
    names: Sequence[str],
    inputs: torch.Tensor,
    overrides: Mapping[str, torch.Tensor],
    reference: tuple[torch.Tensor, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, InputStats]:
    """Input statistics of `names` in block `bid`; linears sharing an input share one Hessian tensor.

    Each shared input is captured once (on its group's first member), so q/k/v cost one
    accumulation, and callers can recognise the shared Hessian by identity. `reference` (the float
    model's inputs to the block and its overrides) adds each input's cross statistics (`capture_hessians`).
    """
    first_of = {name: group[0] for group in model.groups(bid) for name in group}
    captured = sorted({first_of[name] for name in names})
    hessians = capture_hessians(model, bid, inputs, captured, overrides, reference=reference)
    return {name: hessians[first_of[name]] for name in names}


def solve_group(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor | None,
    *,
    method: Method,
    scheme: Scheme,
    options: GPTQOptions,
    label: str,
    input_absmax: float | None = None,
    cross: torch.Tensor | None = None,
) -> list[GPTQResult]:
    """Solve linears that share one input as one problem (one factorization, rows concatenated).

    Rows are independent given H, so this is exactly the per-linear solve, done once. (On the float8
    grid with one scale per tensor, the linears of the group share that scale, which is what runtimes
    that fuse q/k/v or gate/up into one GEMM need anyway.) With `cross` (asymmetric calibration's
    statistics) GPTQ solves for `asymmetric_target` instead of the weights, and the results' errors are
    measured against that target; a method that does not fit outputs (`MethodSpec.fits_outputs`) ignores it.
    """
    spec = get_method(method)
    stacked = torch.cat(list(weights))
    if cross is not None and hessian is not None and spec.fits_outputs:
        stacked = asymmetric_target(stacked, hessian, cross, options.damp_percent)
    result = spec.solve(stacked, hessian, scheme, options, label, input_absmax=input_absmax)
    return split_rows(result, [w.shape[0] for w in weights])


class LocalBackend:
    """Everything in this process: activations, Hessians, quantized weights and AWQ's tensors.

    `results` keeps each linear's solve report (damping used, errors) of the primary target by full
    name, `scale_reports`
    AWQ's search report per block. With `cross_statistics` (`Plan.cross_statistics`) the float model's
    activations run beside the quantized stream, for the cross statistics; only the primary target
    solves for them, as the quantized stream is its own (an extra target, solved on the primary's
    statistics, would cancel errors its own file does not make).
    """

    def __init__(self, model: CheckpointModel, *, recipe: Recipe, tokens: torch.Tensor | None = None,
                 cross_statistics: bool = False) -> None:
        self.model = model
        self.recipe = recipe
        self.tokens = tokens
        self.cross_statistics = cross_statistics
        self.results: dict[str, GPTQResult] = {}
        self.scale_reports: dict[int, object] = {}
        self._reference: torch.Tensor | None = None

    def start(self) -> torch.Tensor | None:
        if self.tokens is None:
            return None
        inputs = self.model.embed(self.tokens)
        if self.cross_statistics:
            self._reference = inputs
        return inputs

    def scale(self, bid: int, inputs: torch.Tensor, targets: Mapping[str, QuantScheme], clip: frozenset[str]
              ) -> dict[str, torch.Tensor]:
        from bitsmith.algos.awq import awq_block

        transform = awq_block(self.model, bid, inputs, targets, self.recipe.awq,
                              grid_search=self.recipe.gptq.grid_search, clip=clip)
        self.scale_reports[bid] = transform.report
        return transform.tensors

    def collect(
        self,
        bid: int,
        names: Sequence[str],
        inputs: torch.Tensor | None,
        applied: Mapping[str, Solved],
        scaled: Mapping[str, torch.Tensor],
    ) -> Stats:
        if inputs is None:
            return None
        reference = None if self._reference is None else (self._reference, self._overrides({}, scaled))
        return collect_stats(self.model, bid, names, inputs, self._overrides(applied, scaled), reference)

    def solve(self, bid: int, names: Sequence[str], assignment: Assignment, stats: Stats,
              scaled: Mapping[str, torch.Tensor], *, target: str = "") -> dict[str, Solved]:
        weights = [scaled[f"{n}.weight"] if f"{n}.weight" in scaled else self.model.linear_weight(bid, n)
                   for n in names]
        first = None if stats is None else stats[names[0]]
        label = ",".join(self.model.full_name(bid, name) for name in names)
        parts = solve_group(weights, None if first is None else first.hessian, method=assignment.method,
                            scheme=assignment.scheme, options=self.recipe.gptq, label=label,
                            input_absmax=None if first is None else first.absmax,
                            cross=None if first is None or target else first.cross)
        if not target:
            self.results.update({self.model.full_name(bid, n): part for n, part in zip(names, parts, strict=True)})
        return {name: part.weight for name, part in zip(names, parts, strict=True)}

    def advance(self, bid: int, inputs: torch.Tensor, applied: Mapping[str, Solved],
                scaled: Mapping[str, torch.Tensor], *, float_outputs: bool) -> torch.Tensor:
        if self._reference is not None:
            self._reference = forward_block(self.model, bid, self._reference, self._overrides({}, scaled))
        return forward_block(self.model, bid, inputs, {} if float_outputs else self._overrides(applied, scaled))

    def finish(self, bid: int, applied: Mapping[str, Solved], scaled: Mapping[str, torch.Tensor], *,
               measure: bool) -> None:
        """Nothing to do: statistics live only as the values `collect` returned to the loop, which drops
        them with the block, and the in-process path reports no held-out output error."""

    @staticmethod
    def _overrides(
        applied: Mapping[str, Solved], scaled: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """AWQ's tensors, with the quantized weights (solved from them) on top."""
        return {**scaled, **{f"{name}.weight": qw.dequantize() for name, qw in applied.items()}}


def quantize_in_process(
    model_dir: str | Path,
    *,
    calib_files: Sequence[Path],
    samples: int,
    seq_len: int,
    recipe: Recipe,
    seed: int = 0,
    device: str = "cpu",
    parallel: bool = False,
    extra: Sequence[tuple[str, Recipe]] = (),
    on_event: Callable[[ProgressEvent], None] | None = None,
    concurrency: int = 1,
) -> QuantizedModel[Solved, torch.Tensor]:
    """Quantize a checkpoint in this process; linears and replaced float tensors by full name
    (`extra` targets are solved on the same statistics, see `Plan.extra`; `concurrency` solves may
    run at once, see `run_sequential`). Whatever `device` solved it, the result is in host memory, as
    the services hand it to the packer: the writers read host tensors.

    >>> from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    >>> out = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=2, seq_len=32,
    ...     recipe=Recipe(method=Method.RTN, scheme=QuantScheme(bits=4)))
    >>> len(out.quantized), out.quantized["model.layers.0.self_attn.q_proj"].shape, out.dense
    (28, (256, 256), {})
    """
    model = load_checkpoint(model_dir, device=device)
    plan = Plan.from_model(model, recipe, parallel=parallel, extra=extra)
    tokens = (
        calibration_tokens(model_dir, calib_files, samples=samples, seq_len=seq_len, seed=seed)
        if plan.needs_calibration
        else None
    )
    backend = LocalBackend(model, recipe=recipe, tokens=tokens, cross_statistics=plan.cross_statistics)
    result = run_sequential(plan, backend, on_event=on_event, concurrency=concurrency)
    return QuantizedModel(quantized={name: _on_host(q) for name, q in result.quantized.items()},
                          dense={name: t.cpu() for name, t in result.dense.items()},
                          extra={key: {name: _on_host(q) for name, q in table.items()}
                                 for key, table in result.extra.items()})


def _on_host(weight: Solved) -> Solved:
    """A solved linear with every tensor field moved to host memory (a no-op for host tensors)."""
    moved: dict[str, Any] = {f.name: value.cpu() for f in fields(weight)
                             if isinstance(value := getattr(weight, f.name), torch.Tensor)}
    return replace(weight, **moved)

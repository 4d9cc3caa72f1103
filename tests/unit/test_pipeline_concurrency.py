"""The block loop with solves running concurrently: what waits on what, failures, cancellation, and
results that do not depend on the concurrency."""

from __future__ import annotations

import contextvars
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import pytest
import torch
from bitsmith.calib import calibration_tokens
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import CancelledError, ConfigError
from bitsmith.models import CheckpointModel
from bitsmith.pipeline import LocalBackend, Plan, ProgressEvent, QuantizedModel, quantize_in_process, run_sequential
from bitsmith.recipes import Assignment, ModuleOverride, Recipe
from bitsmith.schemes import GGMLScheme, GGMLType, GPTQOptions, Method, QuantScheme

GROUPS = [["a", "b"], ["c"], ["d"]]
GPTQ = Recipe(method=Method.GPTQ)
W8 = ("w8", Recipe(method=Method.RTN, scheme=QuantScheme(bits=8)))
TRACE: contextvars.ContextVar[str] = contextvars.ContextVar("TRACE", default="")
MODES = {
    "sequential": dict(parallel=False, true_sequential=True),
    "block-wide": dict(parallel=False, true_sequential=False),
    "parallel": dict(parallel=True, true_sequential=True),
}

Hold = Callable[[int, tuple[str, ...], str], object]


class Fake:
    """A backend whose handles are strings; every call is logged in the order it happened, solves
    from whatever thread runs them. `hold(bid, names, target)` runs inside each solve: it may block,
    sleep or raise."""

    def __init__(self, hold: Hold = lambda bid, names, target: None) -> None:
        self.hold = hold
        self.log: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()
        self.loop_thread = 0
        self.traces: set[str] = set()

    def _record(self, *entry: object) -> None:
        with self.lock:
            self.log.append(entry)

    def snapshot(self) -> list[tuple[Any, ...]]:
        with self.lock:
            return list(self.log)

    def start(self) -> str:
        self.loop_thread = threading.get_ident()
        return "x0"

    def scale(self, bid: int, inputs: str, targets: Mapping[str, QuantScheme]) -> dict[str, str]:
        return {}

    def collect(self, bid: int, names: Sequence[str], inputs: str | None, applied: Mapping[str, str],
                scaled: Mapping[str, str]) -> str:
        self._record("collect", bid, tuple(names), tuple(sorted(applied)))
        return f"stats{bid}{''.join(names)}"

    def solve(self, bid: int, names: Sequence[str], assignment: Assignment, stats: str,
              scaled: Mapping[str, str], *, target: str = "") -> dict[str, str]:
        self._record("start", bid, tuple(names), target)
        self.traces.add(TRACE.get())
        try:
            self.hold(bid, tuple(names), target)
        finally:
            self._record("end", bid, tuple(names), target)
        return {name: f"q{target}{bid}{name}{stats}" for name in names}

    def advance(self, bid: int, inputs: str, applied: Mapping[str, str], scaled: Mapping[str, str], *,
                float_outputs: bool) -> str:
        self._record("advance", bid, tuple(sorted(applied)), float_outputs)
        return f"x{bid + 1}"

    def finish(self, bid: int, applied: Mapping[str, str], scaled: Mapping[str, str], *, measure: bool) -> None:
        self._record("finish", bid, tuple(sorted(applied)), measure, threading.get_ident())


def fake_plan(num_blocks: int, *, parallel: bool, true_sequential: bool = True,
              extra: Sequence[tuple[str, Recipe]] = ()) -> Plan:
    recipe = replace(GPTQ, gptq=GPTQOptions(true_sequential=true_sequential))
    return Plan(num_blocks=num_blocks, groups=[GROUPS] * num_blocks, recipe=recipe, parallel=parallel,
                extra=tuple(extra))


def where(log: Sequence[tuple[Any, ...]], *prefix: object) -> list[int]:
    """Indices of the log entries that start with `prefix`."""
    return [i for i, entry in enumerate(log) if entry[: len(prefix)] == prefix]


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def in_background(run: Callable[[], QuantizedModel[str, str]]) -> Callable[[], QuantizedModel[str, str]]:
    """Start `run` on its own thread (with TRACE set there); the returned callable joins it."""
    pool = ThreadPoolExecutor(max_workers=1)

    def traced() -> QuantizedModel[str, str]:
        TRACE.set("job-1")
        return run()

    future = pool.submit(traced)

    def join() -> QuantizedModel[str, str]:
        try:
            return future.result(timeout=20)
        finally:
            pool.shutdown(wait=True)

    return join


# --- real solves on the demo model: the result does not depend on the concurrency ------------------------------

GGUF = ("gguf:Q8_0", Recipe(method=Method.GPTQ,
                            overrides=(ModuleOverride(pattern=r"\.", scheme=GGMLScheme(type=GGMLType.Q8_0)),)))


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=2, seq_len=32)


def assert_bitwise_equal(left: Any, right: Any) -> None:
    assert type(left) is type(right)
    for f in dataclasses.fields(left):
        a, b = getattr(left, f.name), getattr(right, f.name)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name


@pytest.mark.parametrize("mode", list(MODES))
def test_demo_results_are_bitwise_equal_whatever_the_concurrency(
    demo_checkpoint: CheckpointModel, tokens: torch.Tensor, mode: str
) -> None:
    """GPTQ plus a ggml target on the demo's first two blocks, solved inline and four at a time."""
    recipe = replace(GPTQ, gptq=GPTQOptions(true_sequential=MODES[mode]["true_sequential"]))
    full = Plan.from_model(demo_checkpoint, recipe, parallel=MODES[mode]["parallel"], extra=[GGUF])
    plan = replace(full, num_blocks=2, groups=full.groups[:2])
    outs = [run_sequential(plan, LocalBackend(demo_checkpoint, recipe=recipe, tokens=tokens), concurrency=c)
            for c in (1, 4)]
    inline, pooled = outs
    assert len(inline.quantized) == 14 and len(inline.extra[GGUF[0]]) == 14
    assert list(inline.quantized) == list(pooled.quantized)
    assert list(inline.extra[GGUF[0]]) == list(pooled.extra[GGUF[0]])
    for name, weight in inline.quantized.items():
        assert_bitwise_equal(weight, pooled.quantized[name])
    for name, weight in inline.extra[GGUF[0]].items():
        assert_bitwise_equal(weight, pooled.extra[GGUF[0]][name])


def test_quantize_in_process_takes_the_concurrency() -> None:
    recipe = Recipe(method=Method.RTN, scheme=QuantScheme(bits=4, group_size=64))
    outs = [quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=1, seq_len=8, recipe=recipe,
                                concurrency=c).quantized for c in (1, 3)]
    assert list(outs[0]) == list(outs[1]) and len(outs[0]) == 28
    for name, weight in outs[0].items():
        assert_bitwise_equal(weight, outs[1][name])


# --- the order of work with a recording backend ---------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_same_result_and_events_whatever_the_concurrency(mode: str) -> None:
    def hold(bid: int, names: tuple[str, ...], target: str) -> None:
        time.sleep(0.002 * ((bid + len(names)) % 3))  # let later solves overtake earlier ones

    results, events = [], []
    for concurrency in (1, 4):
        seen: list[ProgressEvent] = []
        results.append(run_sequential(fake_plan(4, **MODES[mode], extra=[W8]), Fake(hold),
                                      on_event=seen.append, concurrency=concurrency))
        events.append(seen)
    assert list(results[0].quantized.items()) == list(results[1].quantized.items())
    assert {k: list(v.items()) for k, v in results[0].extra.items()} == {
        k: list(v.items()) for k, v in results[1].extra.items()}
    assert events[0] == events[1]
    assert sum(e.phase == "solve" for e in events[1]) == fake_plan(4, **MODES[mode], extra=[W8]).solve_steps


def test_parallel_mode_calibrates_ahead_of_the_solves_within_the_bound() -> None:
    """Block 0's solves are held: calibration goes on through block 4 (= 0 + concurrency) and no further."""
    gate = threading.Event()
    backend = Fake(lambda bid, names, target: bid == 0 and gate.wait(20))
    plan = fake_plan(8, parallel=True)
    events: list[ProgressEvent] = []
    event_threads: set[int] = set()

    def on_event(event: ProgressEvent) -> None:
        events.append(event)
        event_threads.add(threading.get_ident())

    join = in_background(lambda: run_sequential(plan, backend, on_event=on_event, concurrency=4))
    try:
        wait_for(lambda: bool(where(backend.snapshot(), "collect", 4)))
        time.sleep(0.2)  # room for a loop that ignores the bound to go on
        held = backend.snapshot()
    finally:
        gate.set()
    out = join()
    assert where(held, "advance", 1) and where(held, "collect", 2)
    assert not where(held, "collect", 5), "block 5 calibrated while block 0 was unfinished"
    assert not where(held, "end", 0) and not where(held, "finish")

    log = backend.snapshot()
    every = ("a", "b", "c", "d")
    assert [entry for entry in log if entry[0] == "collect"] == [("collect", b, every, ()) for b in range(8)]
    assert [entry for entry in log if entry[0] == "advance"] == [("advance", b, (), True) for b in range(8)]
    finishes = [entry for entry in log if entry[0] == "finish"]
    assert finishes == [("finish", b, every, True, backend.loop_thread) for b in range(8)]
    for bid in range(8):
        assert max(where(log, "end", bid)) < where(log, "finish", bid)[0]
        for earlier in range(bid - 4):
            assert where(log, "finish", earlier)[0] < where(log, "collect", bid)[0]
    assert event_threads == {backend.loop_thread}
    assert sum(e.phase == "solve" for e in events) == plan.solve_steps == 24
    assert backend.traces == {"job-1"}
    assert len(out.quantized) == 32


def test_true_sequential_waits_for_the_group_and_never_for_extra_targets() -> None:
    gate = threading.Event()

    def hold(bid: int, names: tuple[str, ...], target: str) -> None:
        if target:
            if bid == 0:
                gate.wait(20)
        else:
            time.sleep(0.02)  # a loop that does not wait would collect before these end

    backend = Fake(hold)
    join = in_background(lambda: run_sequential(fake_plan(2, parallel=False, extra=[W8]), backend, concurrency=4))
    try:
        wait_for(lambda: bool(where(backend.snapshot(), "collect", 1, ("a", "b"))))
        held = backend.snapshot()
    finally:
        gate.set()
    out = join()
    assert not where(held, "end", 0, ("a", "b"), "w8") and not where(held, "finish")

    log = backend.snapshot()
    for bid in range(2):
        solved: list[str] = []
        for names in (("a", "b"), ("c",), ("d",)):
            collect = where(log, "collect", bid, names)
            assert [log[i] for i in collect] == [("collect", bid, names, tuple(solved))]
            for earlier in solved:
                assert max(i for i in where(log, "end", bid) if earlier in log[i][2] and log[i][3] == "") < collect[0]
            solved.extend(names)
        primary_ends = [i for i in where(log, "end", bid) if log[i][3] == ""]
        assert max(primary_ends) < where(log, "advance", bid)[0]
        assert max(where(log, "end", bid)) < where(log, "finish", bid)[0]
        assert log[where(log, "finish", bid)[0]][:4] == ("finish", bid, ("a", "b", "c", "d"), False)
    assert where(log, "collect", 1)[0] < where(log, "end", 0, ("a", "b"), "w8")[0]
    assert len(where(log, "finish")) == 2
    assert len(out.quantized) == 8 and len(out.extra["w8"]) == 8


@pytest.mark.parametrize(("parallel", "failing"), [(True, (1, ("c",), "")), (False, (0, ("a", "b"), "w8"))],
                         ids=["parallel-primary", "sequential-extra"])
def test_a_failed_solve_is_raised_and_stops_the_loop(parallel: bool, failing: tuple[int, tuple[str, ...], str]
                                                     ) -> None:
    def hold(bid: int, names: tuple[str, ...], target: str) -> None:
        if (bid, names, target) == failing:
            raise RuntimeError("solver diverged")
        time.sleep(0.01)

    threads = threading.active_count()
    backend = Fake(hold)
    plan = fake_plan(6, parallel=parallel, extra=[W8])
    with pytest.raises(RuntimeError, match="solver diverged"):
        run_sequential(plan, backend, concurrency=2)
    log = backend.snapshot()
    assert len(where(log, "start")) == len(where(log, "end")), "a solve was still running"
    assert threading.active_count() == threads
    assert not where(log, "collect", failing[0] + 3), "the loop went on past the bound"
    assert len(where(log, "start")) < plan.solve_steps
    time.sleep(0.05)
    assert backend.snapshot() == log, "a solve started after the failure was raised"


def test_should_stop_cancels_and_leaves_no_solve_running() -> None:
    stop = threading.Event()

    def hold(bid: int, names: tuple[str, ...], target: str) -> None:
        if bid == 1:
            stop.set()
        time.sleep(0.02)

    threads = threading.active_count()
    backend = Fake(hold)
    plan = fake_plan(6, parallel=True)
    with pytest.raises(CancelledError):
        run_sequential(plan, backend, should_stop=stop.is_set, concurrency=3)
    log = backend.snapshot()
    assert len(where(log, "start")) == len(where(log, "end"))
    assert threading.active_count() == threads
    assert len(where(log, "start")) < plan.solve_steps
    time.sleep(0.05)
    assert backend.snapshot() == log


def test_should_stop_is_seen_while_waiting_for_solves() -> None:
    """Cancelled while the loop waits for the last block's solves: it raises without starting the queued one."""
    stop, gate = threading.Event(), threading.Event()
    backend = Fake(lambda bid, names, target: gate.wait(20))
    timers = [threading.Timer(0.1, stop.set), threading.Timer(0.5, gate.set)]
    for timer in timers:
        timer.start()
    try:
        with pytest.raises(CancelledError):
            run_sequential(fake_plan(1, parallel=True), backend, should_stop=stop.is_set, concurrency=2)
    finally:
        gate.set()
        for timer in timers:
            timer.join()
    assert len(where(backend.snapshot(), "start")) == 2  # of 3: the third was still queued


def test_inline_solves_keep_the_order_and_finish_after_advance() -> None:
    """Concurrency 1: everything in the loop's thread, as before, with `finish` right after `advance`."""
    backend = Fake()
    run_sequential(fake_plan(2, parallel=False), backend,
                   on_event=lambda event: backend._record("event", event.block, event.phase))
    block0 = [entry[:3] for entry in backend.log[: where(backend.log, "event", 0, "done")[0] + 1]]
    assert [entry for entry in block0 if entry[0] != "event"] == [
        ("collect", 0, ("a", "b")), ("start", 0, ("a", "b")), ("end", 0, ("a", "b")),
        ("collect", 0, ("c",)), ("start", 0, ("c",)), ("end", 0, ("c",)),
        ("collect", 0, ("d",)), ("start", 0, ("d",)), ("end", 0, ("d",)),
        ("advance", 0, ("a", "b", "c", "d")), ("finish", 0, ("a", "b", "c", "d")),
    ]
    assert block0[-1] == ("event", 0, "done")


def test_uncalibrated_blocks_are_never_finished() -> None:
    backend = Fake()
    plan = replace(fake_plan(3, parallel=True), recipe=Recipe(method=Method.RTN))
    out = run_sequential(plan, backend, concurrency=2)
    assert not where(backend.log, "finish") and not where(backend.log, "advance")
    assert len(out.quantized) == 12


@pytest.mark.parametrize("concurrency", [0, -1])
def test_concurrency_below_one_is_refused(concurrency: int) -> None:
    with pytest.raises(ConfigError, match="concurrency"):
        run_sequential(fake_plan(1, parallel=False), Fake(), concurrency=concurrency)

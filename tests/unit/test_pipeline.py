"""The block loop's order of work (with a recording backend) and the in-process path on the demo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
import torch
from bitsmith.algos import quantize_rtn, solve_gptq
from bitsmith.calib import calibration_tokens, capture_hessians, forward_block
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import CancelledError
from bitsmith.pipeline import LocalBackend, Plan, ProgressEvent, quantize_in_process, run_sequential
from bitsmith.schemes import GPTQOptions, GridSearch, Method, QuantScheme

GROUPS = [["a", "b"], ["c"], ["d"]]


class Recorder:
    """A backend whose handles are strings describing how they were made."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def start(self) -> str:
        self.calls.append(("start",))
        return "x0"

    def collect(self, bid: int, names: Sequence[str], inputs: str | None, applied: Mapping[str, str]) -> str:
        self.calls.append(("collect", bid, tuple(names), inputs, tuple(sorted(applied))))
        return f"stats{bid}{''.join(names)}"

    def solve(self, bid: int, names: Sequence[str], stats: str) -> dict[str, str]:
        self.calls.append(("solve", bid, tuple(names), stats))
        return {name: f"q{bid}{name}" for name in names}

    def advance(self, bid: int, inputs: str, applied: Mapping[str, str]) -> str:
        self.calls.append(("advance", bid, inputs, tuple(sorted(applied))))
        return f"x{bid + 1}"


PLAN = Plan(num_blocks=2, groups=[GROUPS, GROUPS])


def test_true_sequential_order() -> None:
    backend = Recorder()
    events: list[ProgressEvent] = []
    out = run_sequential(PLAN, backend, needs_calibration=True, true_sequential=True, on_event=events.append)
    assert backend.calls[:8] == [
        ("start",),
        ("collect", 0, ("a", "b"), "x0", ()),
        ("solve", 0, ("a", "b"), "stats0ab"),
        ("collect", 0, ("c",), "x0", ("a", "b")),
        ("solve", 0, ("c",), "stats0c"),
        ("collect", 0, ("d",), "x0", ("a", "b", "c")),
        ("solve", 0, ("d",), "stats0d"),
        ("advance", 0, "x0", ("a", "b", "c", "d")),
    ]
    assert backend.calls[8] == ("collect", 1, ("a", "b"), "x1", ())
    assert out == {f"model.layers.{b}.{n}": f"q{b}{n}" for b in range(2) for n in "abcd"}
    assert [e.phase for e in events[:3]] == ["calibrate", "solve", "calibrate"]
    assert events[-1].phase == "done" and events[-1].block == 1 and events[-1].num_blocks == 2


def test_block_wide_collect_without_true_sequential() -> None:
    backend = Recorder()
    run_sequential(PLAN, backend, needs_calibration=True, true_sequential=False)
    assert backend.calls[1:6] == [
        ("collect", 0, ("a", "b", "c", "d"), "x0", ()),
        ("solve", 0, ("a", "b"), "stats0abcd"),
        ("solve", 0, ("c",), "stats0abcd"),
        ("solve", 0, ("d",), "stats0abcd"),
        ("advance", 0, "x0", ("a", "b", "c", "d")),
    ]


def test_no_calibration_never_starts_or_advances() -> None:
    backend = Recorder()
    out = run_sequential(PLAN, backend, needs_calibration=False, true_sequential=True)
    kinds = [call[0] for call in backend.calls]
    assert "start" not in kinds and "advance" not in kinds
    assert backend.calls[0] == ("collect", 0, ("a", "b", "c", "d"), None, ())
    assert len(out) == 8


def test_should_stop_cancels_between_steps() -> None:
    backend = Recorder()
    polls = iter([False, False, False, True])
    with pytest.raises(CancelledError, match="block 0"):
        run_sequential(PLAN, backend, needs_calibration=True, true_sequential=True, should_stop=lambda: next(polls))
    assert [c[0] for c in backend.calls] == ["start", "collect", "solve", "collect"][: len(backend.calls)]
    assert len(backend.calls) == 4


def test_plan_from_model(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    plan = Plan.from_model(demo_checkpoint)
    assert plan.num_blocks == 4 and plan.groups[0] == demo_checkpoint.groups(0)
    assert plan.full_name(2, "mlp.up_proj") == "model.layers.2.mlp.up_proj"


@pytest.mark.parametrize("search", [None, GridSearch(steps=20)], ids=["minmax", "grid-search"])
def test_rtn_in_process_equals_rtn_per_weight(demo_checkpoint, search: GridSearch | None) -> None:  # type: ignore[no-untyped-def]
    scheme = QuantScheme(bits=3, group_size=64)
    out = quantize_in_process(
        DEMO_MODEL,
        calib_files=CALIB_FILES,
        samples=1,
        seq_len=8,
        scheme=scheme,
        method=Method.RTN,
        options=GPTQOptions(grid_search=search),
    )
    assert len(out) == 28
    for bid, local in [(0, "self_attn.k_proj"), (3, "mlp.down_proj")]:
        expected = quantize_rtn(demo_checkpoint.linear_weight(bid, local), scheme, search=search)
        assert torch.equal(out[demo_checkpoint.full_name(bid, local)].codes, expected.codes)


def test_gptq_local_backend_is_sequential(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Block 1's q/k/v are solved on Hessians of block 0's *quantized* output, as one problem."""
    scheme, options = QuantScheme(bits=4, group_size=128), GPTQOptions()
    tokens = calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=2, seq_len=32)
    backend = LocalBackend(demo_checkpoint, scheme=scheme, method=Method.GPTQ, options=options, tokens=tokens)
    # Block 1 is cut to its first group to keep this fast; the loop does not care.
    plan = Plan(num_blocks=2, groups=[demo_checkpoint.groups(0), demo_checkpoint.groups(1)[:1]])
    events: list[ProgressEvent] = []
    out = run_sequential(plan, backend, needs_calibration=True, true_sequential=True, on_event=events.append)
    assert len(out) == 10 and len(events) == (4 * 2 + 2) + (1 * 2 + 2)

    block0 = {name.split(".", 3)[3] + ".weight": qw.dequantize() for name, qw in out.items() if ".0." in name}
    inputs = forward_block(demo_checkpoint, 0, demo_checkpoint.embed(tokens), block0)
    hessian = capture_hessians(demo_checkpoint, 1, inputs, ["self_attn.q_proj"])["self_attn.q_proj"][0]
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    joint = solve_gptq(torch.cat([demo_checkpoint.linear_weight(1, n) for n in qkv]), hessian, scheme, options)
    got = torch.cat([out[f"model.layers.1.{n}"].codes for n in qkv])
    assert (got != joint.weight.codes).float().mean() < 1e-3
    report = backend.results["model.layers.1.self_attn.k_proj"]
    assert report.error < report.rtn_error and report.damp_percent == pytest.approx(0.01)

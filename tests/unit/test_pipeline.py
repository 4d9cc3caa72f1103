"""The block loop's order of work (with a recording backend) and the in-process path on the demo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest
import torch
from bitsmith.algos import quantize_rtn, solve_gptq
from bitsmith.calib import calibration_tokens, capture_hessians, forward_block
from bitsmith.demo import CALIB_FILES, DEMO_MODEL
from bitsmith.errors import CancelledError
from bitsmith.pipeline import LocalBackend, Plan, ProgressEvent, quantize_in_process, run_sequential
from bitsmith.quantized import QuantizedWeight
from bitsmith.recipes import Assignment, ModuleOverride, Recipe
from bitsmith.schemes import AWQOptions, GPTQOptions, GridSearch, Method, QuantScheme

GROUPS = [["a", "b"], ["c"], ["d"]]
GPTQ = Recipe(method=Method.GPTQ)
RTN = Recipe(method=Method.RTN)


class Recorder:
    """A backend whose handles are strings describing how they were made."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.finished: list[tuple[int, tuple[str, ...], bool]] = []
        self.clipped: dict[int, frozenset[str]] = {}

    def start(self) -> str:
        self.calls.append(("start",))
        return "x0"

    def scale(self, bid: int, inputs: str, targets: Mapping[str, QuantScheme], clip: frozenset[str]
              ) -> dict[str, str]:
        self.calls.append(("scale", bid, inputs, tuple(sorted(targets))))
        self.clipped[bid] = clip
        return {"norm.weight": f"n{bid}", "a.weight": f"s{bid}a", "c.weight": f"s{bid}c"}

    def collect(self, bid: int, names: Sequence[str], inputs: str | None, applied: Mapping[str, str],
                scaled: Mapping[str, str]) -> str:
        self.calls.append(("collect", bid, tuple(names), inputs, tuple(sorted(applied))))
        return f"stats{bid}{''.join(names)}"

    def solve(self, bid: int, names: Sequence[str], assignment: Assignment, stats: str,
              scaled: Mapping[str, str], *, target: str = "") -> dict[str, str]:
        self.calls.append(("solve", bid, tuple(names), stats, assignment.method.value, assignment.scheme.bits))
        return {name: f"q{bid}{name}" for name in names}

    def advance(self, bid: int, inputs: str, applied: Mapping[str, str], scaled: Mapping[str, str], *,
                float_outputs: bool) -> str:
        self.calls.append(("advance", bid, inputs, tuple(sorted(applied)), tuple(sorted(scaled)))
                          + (("float",) if float_outputs else ()))
        return f"x{bid + 1}"

    def finish(self, bid: int, applied: Mapping[str, str], scaled: Mapping[str, str], *, measure: bool) -> None:
        self.finished.append((bid, tuple(sorted(applied)), measure))


def plan(recipe: Recipe) -> Plan:
    return Plan(num_blocks=2, groups=[GROUPS, GROUPS], recipe=recipe)


def test_true_sequential_order() -> None:
    backend = Recorder()
    events: list[ProgressEvent] = []
    out = run_sequential(plan(GPTQ), backend, on_event=events.append)
    assert backend.calls[:8] == [
        ("start",),
        ("collect", 0, ("a", "b"), "x0", ()),
        ("solve", 0, ("a", "b"), "stats0ab", "gptq", 4),
        ("collect", 0, ("c",), "x0", ("a", "b")),
        ("solve", 0, ("c",), "stats0c", "gptq", 4),
        ("collect", 0, ("d",), "x0", ("a", "b", "c")),
        ("solve", 0, ("d",), "stats0d", "gptq", 4),
        ("advance", 0, "x0", ("a", "b", "c", "d"), ()),
    ]
    assert backend.calls[8] == ("collect", 1, ("a", "b"), "x1", ())
    assert out.quantized == {f"model.layers.{b}.{n}": f"q{b}{n}" for b in range(2) for n in "abcd"}
    assert out.dense == {}
    assert [e.phase for e in events[:3]] == ["calibrate", "solve", "calibrate"]
    assert events[-1].phase == "done" and events[-1].block == 1 and events[-1].num_blocks == 2


def test_extra_targets_share_each_capture_and_never_move_the_loop() -> None:
    """An extra target is solved on the primary's statistics; linears only it solves are captured too,
    and only the primary's results are applied when the loop moves on."""
    backend = Recorder()
    primary = replace(GPTQ, overrides=(ModuleOverride(pattern=r"\.c$", skip=True),))
    w8 = Recipe(method=Method.RTN, scheme=QuantScheme(bits=8))
    out = run_sequential(replace(plan(primary), extra=(("w8", w8),)), backend)
    assert backend.calls[:10] == [
        ("start",),
        ("collect", 0, ("a", "b"), "x0", ()),
        ("solve", 0, ("a", "b"), "stats0ab", "gptq", 4),
        ("solve", 0, ("a", "b"), "stats0ab", "rtn", 8),
        ("collect", 0, ("c",), "x0", ("a", "b")),
        ("solve", 0, ("c",), "stats0c", "rtn", 8),
        ("collect", 0, ("d",), "x0", ("a", "b")),
        ("solve", 0, ("d",), "stats0d", "gptq", 4),
        ("solve", 0, ("d",), "stats0d", "rtn", 8),
        ("advance", 0, "x0", ("a", "b", "d"), ()),
    ]
    assert set(out.quantized) == {f"model.layers.{b}.{n}" for b in range(2) for n in "abd"}
    assert out.extra == {"w8": {f"model.layers.{b}.{n}": f"q{b}{n}" for b in range(2) for n in "abcd"}}
    assert replace(plan(primary), extra=(("w8", w8),)).solve_steps == 2 * (2 + 3)  # units, not linears


def test_block_wide_collect_without_true_sequential() -> None:
    backend = Recorder()
    run_sequential(plan(replace(GPTQ, gptq=GPTQOptions(true_sequential=False))), backend)
    assert backend.calls[1:6] == [
        ("collect", 0, ("a", "b", "c", "d"), "x0", ()),
        ("solve", 0, ("a", "b"), "stats0abcd", "gptq", 4),
        ("solve", 0, ("c",), "stats0abcd", "gptq", 4),
        ("solve", 0, ("d",), "stats0abcd", "gptq", 4),
        ("advance", 0, "x0", ("a", "b", "c", "d"), ()),
    ]


def test_no_calibration_never_starts_or_advances() -> None:
    backend = Recorder()
    out = run_sequential(plan(RTN), backend)
    kinds = [call[0] for call in backend.calls]
    assert "start" not in kinds and "advance" not in kinds
    assert backend.calls[0] == ("collect", 0, ("a", "b", "c", "d"), None, ())
    assert len(out.quantized) == 8


def test_overrides_split_shared_inputs_and_skip_linears() -> None:
    """b at 8 bits is its own unit beside a (one collect serves both); d is skipped in block 1 only."""
    recipe = replace(GPTQ, overrides=(
        ModuleOverride(pattern=r"\.b$", scheme=QuantScheme(bits=8)),
        ModuleOverride(pattern=r"layers\.1\.d", skip=True),
        ModuleOverride(pattern=r"\.c$", method=Method.RTN),
    ))
    backend = Recorder()
    out = run_sequential(plan(recipe), backend)
    block0 = backend.calls[1:9]
    assert block0 == [
        ("collect", 0, ("a", "b"), "x0", ()),
        ("solve", 0, ("a",), "stats0ab", "gptq", 4),
        ("solve", 0, ("b",), "stats0ab", "gptq", 8),
        ("collect", 0, ("c",), "x0", ("a", "b")),
        ("solve", 0, ("c",), "stats0c", "rtn", 4),
        ("collect", 0, ("d",), "x0", ("a", "b", "c")),
        ("solve", 0, ("d",), "stats0d", "gptq", 4),
        ("advance", 0, "x0", ("a", "b", "c", "d"), ()),
    ]
    assert ("collect", 1, ("d",), "x1", ("a", "b", "c")) not in backend.calls
    assert backend.calls[-1] == ("advance", 1, "x1", ("a", "b", "c"), ())
    assert "model.layers.1.d" not in out.quantized and len(out.quantized) == 7
    assert plan(recipe).solve_steps == 7


def test_awq_scales_each_block_first_and_returns_what_codes_do_not_replace() -> None:
    """AWQ on a and c only (b, d by GPTQ): scale sees those targets; the folded norm and the rescaled
    weight of the skipped c (block 1) come back as dense tensors, the quantized a's does not."""
    recipe = Recipe(method=Method.GPTQ, overrides=(
        ModuleOverride(pattern=r"layers\.1\.c", skip=True),
        ModuleOverride(pattern=r"\.(a|c)$", method=Method.AWQ),
    ))
    backend = Recorder()
    out = run_sequential(plan(recipe), backend)
    assert backend.calls[1] == ("scale", 0, "x0", ("a", "c"))
    assert ("scale", 1, "x1", ("a",)) in backend.calls
    assert backend.calls[-1] == ("advance", 1, "x1", ("a", "b", "d"), ("a.weight", "c.weight", "norm.weight"))
    assert out.dense == {"model.layers.0.norm.weight": "n0", "model.layers.1.norm.weight": "n1",
                         "model.layers.1.c.weight": "s1c"}
    assert backend.clipped == {0: {"a", "c"}, 1: {"a"}}


def test_awq_clips_only_the_linears_it_rounds_to_nearest() -> None:
    """awq+gptq linears are scaled but never clipped (GPTQ fits their ranges); options without clipping
    clip nothing."""
    mixed = Recipe(method=Method.AWQ_GPTQ, overrides=(ModuleOverride(pattern=r"\.c$", method=Method.AWQ),))
    backend = Recorder()
    run_sequential(plan(mixed), backend)
    assert [c[3] for c in backend.calls if c[0] == "scale"] == [("a", "b", "c", "d")] * 2
    assert backend.clipped == {0: {"c"}, 1: {"c"}}
    assert plan(replace(mixed, awq=AWQOptions(clip=False))).clip_targets(0) == frozenset()


def test_parallel_mode_advances_the_float_block() -> None:
    """Parallel mode: one collect per block with nothing applied (the float model's statistics), the
    float block advanced, and each block finished with its solves applied, to be measured."""
    recipe = Recipe(method=Method.AWQ)
    backend = Recorder()
    run_sequential(Plan(num_blocks=2, groups=[GROUPS, GROUPS], recipe=recipe, parallel=True), backend)
    advances = [call for call in backend.calls if call[0] == "advance"]
    every, scaled = ("a", "b", "c", "d"), ("a.weight", "c.weight", "norm.weight")
    assert advances == [("advance", 0, "x0", (), scaled, "float"), ("advance", 1, "x1", (), scaled, "float")]
    assert [call for call in backend.calls if call[0] == "collect" and call[1] == 1] == [
        ("collect", 1, every, "x1", ())]
    assert backend.finished == [(0, every, True), (1, every, True)]


def test_sequential_mode_finishes_each_block_after_its_advance() -> None:
    backend = Recorder()
    run_sequential(plan(GPTQ), backend)
    assert backend.finished == [(0, ("a", "b", "c", "d"), False), (1, ("a", "b", "c", "d"), False)]


def test_should_stop_cancels_between_steps() -> None:
    backend = Recorder()
    polls = iter([False, False, False, True])
    with pytest.raises(CancelledError, match="block 0"):
        run_sequential(plan(GPTQ), backend, should_stop=lambda: next(polls))
    assert [c[0] for c in backend.calls] == ["start", "collect", "solve", "collect"][: len(backend.calls)]
    assert len(backend.calls) == 4


def test_plan_from_model(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    plan = Plan.from_model(demo_checkpoint, GPTQ)
    assert plan.num_blocks == 4 and plan.groups[0] == demo_checkpoint.groups(0)
    assert plan.full_name(2, "mlp.up_proj") == "model.layers.2.mlp.up_proj"
    assert plan.needs_calibration and not Plan.from_model(demo_checkpoint, RTN).needs_calibration


@pytest.mark.parametrize("search", [None, GridSearch(steps=20)], ids=["minmax", "grid-search"])
def test_rtn_in_process_equals_rtn_per_weight(demo_checkpoint, search: GridSearch | None) -> None:  # type: ignore[no-untyped-def]
    scheme = QuantScheme(bits=3, group_size=64)
    out = quantize_in_process(
        DEMO_MODEL,
        calib_files=CALIB_FILES,
        samples=1,
        seq_len=8,
        recipe=Recipe(scheme=scheme, method=Method.RTN, gptq=GPTQOptions(grid_search=search)),
    ).quantized
    assert len(out) == 28
    for bid, local in [(0, "self_attn.k_proj"), (3, "mlp.down_proj")]:
        expected = quantize_rtn(demo_checkpoint.linear_weight(bid, local), scheme, search=search)
        assert torch.equal(out[demo_checkpoint.full_name(bid, local)].codes, expected.codes)


def test_gptq_local_backend_is_sequential(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Block 1's q/k/v are solved on Hessians of block 0's *quantized* output, as one problem."""
    scheme, options = QuantScheme(bits=4, group_size=128), GPTQOptions()
    tokens = calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=2, seq_len=32)
    recipe = Recipe(scheme=scheme, method=Method.GPTQ, gptq=options)
    backend = LocalBackend(demo_checkpoint, recipe=recipe, tokens=tokens)
    # Block 1 is cut to its first group to keep this fast; the loop does not care.
    plan = Plan(num_blocks=2, groups=[demo_checkpoint.groups(0), demo_checkpoint.groups(1)[:1]], recipe=recipe)
    events: list[ProgressEvent] = []
    out = run_sequential(plan, backend, on_event=events.append).quantized
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


def test_asymmetric_calibration_follows_the_float_stream_in_sequential_mode_only(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """Block 0's q/k/v see the embeddings on both streams (X̃ = X, so W* = W: the same solve but for the
    float64 round trip of W*); later linears are solved for the float model's outputs, so their codes move. Parallel
    mode calibrates on the float model, where there is nothing to cross, and ignores the option."""
    scheme = QuantScheme(bits=4, group_size=128)

    def run(asymmetric: bool, parallel: bool = False) -> dict[str, QuantizedWeight]:
        recipe = Recipe(scheme=scheme, method=Method.GPTQ, gptq=GPTQOptions(asymmetric_calibration=asymmetric))
        out = quantize_in_process(DEMO_MODEL, calib_files=CALIB_FILES, samples=2, seq_len=32, recipe=recipe,
                                  parallel=parallel).quantized
        return {name: qw for name, qw in out.items() if isinstance(qw, QuantizedWeight)}

    plain, asymmetric = run(False), run(True)
    first, later = "model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"
    assert (plain[first].codes != asymmetric[first].codes).float().mean() < 0.02
    assert (plain[later].codes != asymmetric[later].codes).float().mean() > 0.02
    parallel = run(False, parallel=True)
    for name, qw in run(True, parallel=True).items():
        assert torch.equal(qw.codes, parallel[name].codes), name


def test_only_the_primary_target_solves_for_the_cross_statistics(demo_checkpoint) -> None:  # type: ignore[no-untyped-def]
    """The cross statistics describe the primary target's quantized stream: its solve uses them, an extra
    target's solve on the same statistics does not, and plain rounding to nearest never reads them."""
    from bitsmith.calib.stats import InputStats

    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    columns = demo_checkpoint.linear_shape(0, names[0])[1]
    x = torch.randn(512, columns, generator=torch.Generator().manual_seed(0))
    x_float = x + 0.3 * torch.randn(512, columns, generator=torch.Generator().manual_seed(1))
    hessian, cross = 2 * x.T @ x / 512, 2 * x.T @ x_float / 512
    crossed = dict.fromkeys(names, InputStats(hessian=hessian, tokens=512, absmax=1.0, cross=cross))
    plain = dict.fromkeys(names, InputStats(hessian=hessian, tokens=512, absmax=1.0))
    backend = LocalBackend(demo_checkpoint, recipe=Recipe())

    def codes(method: Method, stats: dict[str, InputStats], target: str = "") -> list[torch.Tensor]:
        solved = backend.solve(0, names, Assignment(method=method, scheme=QuantScheme(bits=4, group_size=128)),
                               stats, {}, target=target)
        return [solved[n].codes for n in names]  # type: ignore[union-attr]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))

    base = codes(Method.GPTQ, plain, "extra")
    assert same(codes(Method.GPTQ, crossed, "extra"), base)
    assert not same(codes(Method.GPTQ, crossed), base)
    assert same(codes(Method.RTN, crossed), codes(Method.RTN, plain))
    assert not same(codes(Method.AWQ, crossed), codes(Method.AWQ, plain))  # AWQ rounds the float model's target

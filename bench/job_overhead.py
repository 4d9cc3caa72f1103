"""What the services cost: one demo-model job through the stack vs the same work called in-process.

Runs, in one process and one after the other on the same machine:
  services:   start a local stack (Ray actors + gRPC), submit the job, follow it to the end; the time
              of each phase is read from the job's diagnostics (the coordinator's timeline of its calls);
  in-process: the same calibration, solve, pack and evaluation through `bitsmith` library calls.
Prints a table of seconds per phase and the services/in-process ratio, with the hardware.

    python bench/job_overhead.py [--samples 128] [--seq-len 512] [--bits 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

PHASE_OF_JOB = {"plan": "calibrate", "calibrate": "calibrate", "scale": "calibrate", "solve": "solve", "pack": "pack",
                "publish": "pack", "evaluate": "eval"}
"""The job's phases (`JobDiagnostics.phases`) as this table groups them."""
PHASES = ("stack start", "calibrate", "solve", "pack", "eval", "total")


class TimedBackend:
    """Wraps a pipeline backend and adds up the seconds spent in each of its steps."""

    def __init__(self, inner: Any, seconds: dict[str, float]) -> None:
        self._inner = inner
        self._seconds = seconds

    def _timed(self, phase: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._seconds[phase] += time.perf_counter() - t0

    def start(self) -> Any:
        return self._timed("calibrate", self._inner.start)

    def scale(self, bid: int, inputs: Any, targets: Mapping[str, Any]) -> Any:
        return self._timed("calibrate", self._inner.scale, bid, inputs, targets)

    def collect(self, bid: int, names: Sequence[str], inputs: Any, applied: Mapping[str, Any],
                scaled: Mapping[str, Any]) -> Any:
        return self._timed("calibrate", self._inner.collect, bid, names, inputs, applied, scaled)

    def solve(self, bid: int, names: Sequence[str], assignment: Any, stats: Any, scaled: Mapping[str, Any], *,
              target: str = "") -> Any:
        return self._timed("solve", lambda: self._inner.solve(bid, names, assignment, stats, scaled, target=target))

    def advance(self, bid: int, inputs: Any, applied: Mapping[str, Any], scaled: Mapping[str, Any], *,
                float_outputs: bool) -> Any:
        return self._timed("calibrate",
                           lambda: self._inner.advance(bid, inputs, applied, scaled, float_outputs=float_outputs))

    def finish(self, bid: int, applied: Mapping[str, Any], scaled: Mapping[str, Any], *, measure: bool) -> None:
        self._timed("calibrate", lambda: self._inner.finish(bid, applied, scaled, measure=measure))


def in_process(args: argparse.Namespace, work: Path) -> dict[str, float]:
    from bitsmith.calib import calibration_tokens
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
    from bitsmith.formats import get_format
    from bitsmith.manifest import build_artifact
    from bitsmith.models import load_checkpoint
    from bitsmith.pipeline import LocalBackend, Plan, run_sequential
    from bitsmith.runtimes import evaluate_path
    from bitsmith.schemes import Format

    seconds: dict[str, float] = defaultdict(float)
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    model = load_checkpoint(DEMO_MODEL)
    tokens = calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=args.samples, seq_len=args.seq_len)
    seconds["calibrate"] += time.perf_counter() - t0
    job_recipe = recipe(args.bits)
    options = job_recipe.gptq
    backend = TimedBackend(LocalBackend(model, recipe=job_recipe, tokens=tokens), seconds)
    quantized = run_sequential(Plan.from_model(model, job_recipe), backend).quantized
    t0 = time.perf_counter()
    out = work / "in-process"
    write = get_format(Format.GPTQ).write
    build_artifact(out, lambda d: write(d, source_model_dir=DEMO_MODEL, quantized=quantized, options=options),
                   format=Format.GPTQ, recipe={"method": "gptq", "bits": args.bits})
    seconds["pack"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate_path(out, list(EVAL_FILES), reference=DEMO_MODEL)
    seconds["eval"] += time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_all
    return seconds


def through_services(args: argparse.Namespace, work: Path) -> dict[str, float]:
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
    from bitsmith.rpc import Calibration, Client, Evaluation, QuantizeRequest
    from bitsmith_services.stack import LocalStack

    seconds: dict[str, float] = defaultdict(float)
    t_all = time.perf_counter()
    with LocalStack(home=work / "home") as stack:
        seconds["stack start"] = time.perf_counter() - t_all
        request = QuantizeRequest(
            model=DEMO_MODEL, out=work / "services", recipe=recipe(args.bits), checkpoint_format="gptq",
            calibration=Calibration(files=CALIB_FILES, samples=args.samples, seq_len=args.seq_len),
            evaluation=Evaluation(files=EVAL_FILES, seq_len=512),
        )
        with Client(stack.address) as client:
            job = client.submit(request).wait()
    seconds["total"] = time.perf_counter() - t_all
    for phase in job.diagnostics.phases:
        seconds[PHASE_OF_JOB[phase.phase]] += phase.seconds
    return seconds


def recipe(bits: int) -> Any:
    """The job both sides run: GPTQ at `bits`, g128, asymmetric with zeros >= 1 (a GPTQ v1 checkpoint)."""
    from bitsmith.recipes import Recipe
    from bitsmith.schemes import Method, QuantScheme

    return Recipe(method=Method.GPTQ, scheme=QuantScheme(bits=bits, group_size=128, min_zero=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bitsmith-bench-") as tmp:
        work = Path(tmp)
        services = through_services(args, work)
        local = in_process(args, work)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}, "
          f"python {platform.python_version()}; GPTQ w{args.bits} g128 on the demo model, "
          f"{args.samples} x {args.seq_len} calibration tokens")
    print(f"{'phase':<12} {'services s':>11} {'in-process s':>13} {'ratio':>7}")
    for phase in PHASES:
        svc, lib = services.get(phase, 0.0), local.get(phase, 0.0)
        ratio = f"{svc / lib:7.2f}" if lib > 0 else "      -"
        print(f"{phase:<12} {svc:11.2f} {lib:13.2f} {ratio}")


if __name__ == "__main__":
    main()

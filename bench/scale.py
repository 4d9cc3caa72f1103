"""Solver replicas: one parallel-mode job and N small jobs on 1 against 2 solver replicas (GPUs) of one host.

A job leases `Resources(gpus=N)` solver replicas and its solves fan out over them; in parallel calibration
mode calibration moves on to the next block while the solves run, so with two replicas the solve phase
should take about half as long, and with several jobs side by side two replicas should finish about twice
as many jobs a minute. This measures both, on one host with no Ray and no network:

- the calibrator, packer and runtimes start once, and two solvers, each a plain `bitsmith serve` process;
  on a CUDA host solver i sees GPU i (`CUDA_VISIBLE_DEVICES=i`; the calibrator GPU `--calibrator-gpu`),
  on a CPU host (`--device cpu`) each solver computes on `--threads` torch threads (OMP_NUM_THREADS), so
  two replicas compete fairly with one;
- two coordinators over them, each its own process, side by side: "1 replica" (its --services name the
  first solver) and "2 replicas" (both);
- one parallel-mode GPTQ job (w4 g128 asym, GPTQ v2, on a random-weight checkpoint of `--shape` written
  as bench/quantize_model.py does) with gpus=1 on "1 replica", then gpus=2 on "2 replicas": the job's
  wall seconds and its solve phase (first solve start to last solve end in the job's timeline), the ratio
  1 -> 2, and that both artifacts have the same sha256 (two replicas must not change a bit);
- `--jobs` small jobs (the same model, sequential mode, gpus=1 each, distinct outputs), submitted at once
  to "1 replica", then to "2 replicas": jobs per minute and the ratio; every job must succeed, and the
  jobs on "2 replicas" must have used both replicas (they share one calibrator, which computes one
  job's block at a time: the small-job ratio is bounded by it).

One warm-up job per coordinator (on a one-block checkpoint of the same shape) runs first, so imports and
first-call costs land outside the numbers. The target is >= 1.8x for parallel-mode solves on 2 GPUs;
where the host has fewer than 2 GPUs (or none) both solvers share what there is: the ratios then measure
how much two replicas overlap, not how the solves scale, and the target line says so.

    python bench/scale.py [--device auto|cpu|cuda] [--threads N] [--calibrator-gpu 0]
                          [--shape tiny|8b] [--layers N] [--samples N] [--seq-len N] [--jobs 8]
                          [--repeats 1] [--json PATH] [--work DIR]

Exits 1 when a check fails. docs/benchmarks.md ("Scale: solver replicas") has a run's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import torch
from load import coordinator
from machine import hardware
from quantize_model import SHAPES, job_request, write_calibration_text, write_checkpoint, write_tokenizer

TARGET = 1.8
SHARED_ROLES = ("calibrator", "packer", "runtime_cpu", "runtime_apple", "runtime_nvidia")
CALL_TIMEOUT_S = 3600.0
MANIFEST = "manifest.json"


def gpu_line() -> str:
    """The GPUs torch sees, in a few words."""
    if not torch.cuda.is_available():
        return "no GPU"
    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    return f"{count} x {props.name} ({props.total_memory / 2**30:.0f} GiB); torch {torch.__version__}"


def serve(stack: ExitStack, work: Path, role: str, name: str, args: Sequence[str], env: dict[str, str]) -> str:
    """One worker service as a `bitsmith serve` process (stopped when `stack` closes); its address."""
    cmd = [sys.executable, "-m", "bitsmith_services.cli", "serve", role, "--port", "0",
           "--store", str(work / "store"), *args]
    log: IO[str] = stack.enter_context(open(work / f"{name}.log", "w"))  # noqa: SIM115 - closed by the stack
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env})
    stack.callback(proc.wait, timeout=60)
    stack.callback(proc.terminate)
    line = proc.stdout.readline().strip() if proc.stdout else ""
    if not line:
        raise SystemExit(f"the {name} service did not start; see {work / f'{name}.log'}")
    return line


@contextmanager
def services(work: Path, args: argparse.Namespace, gpus: int) -> Iterator[tuple[dict[str, str], list[str]]]:
    """The shared workers (role -> address) and the two solvers (addresses), as processes."""
    with ExitStack() as stack:
        shared: dict[str, str] = {}
        for role in SHARED_ROLES:
            extra: list[str] = []
            env: dict[str, str] = {}
            if role == "calibrator":
                extra = ["--device", args.device, "--activations", "host"]
                if args.device == "cuda":
                    env["CUDA_VISIBLE_DEVICES"] = str(args.calibrator_gpu)
            shared[role] = serve(stack, work, role, role, extra, env)
        solvers = []
        for i in range(2):
            env = {"OMP_NUM_THREADS": str(args.threads)}
            if args.device == "cuda":
                env["CUDA_VISIBLE_DEVICES"] = str(i % gpus)
            solvers.append(serve(stack, work, "solver", f"solver-{i}", ["--device", args.device], env))
        yield shared, solvers


def services_spec(shared: dict[str, str], solvers: Sequence[str]) -> str:
    return ",".join([*(f"{role}={address}" for role, address in shared.items()),
                     *(f"solver={address}" for address in solvers)])


def request(model: Path, calib: Path, out: Path, args: argparse.Namespace, *, parallel: bool, gpus: int) -> Any:
    """quantize_model's GPTQ w4 g128 request, in parallel or sequential calibration mode, on `gpus` replicas."""
    from bitsmith.rpc import Resources

    base = job_request(model, calib, out, args.samples, args.seq_len)
    mode = "parallel" if parallel else "sequential"
    return dataclasses.replace(base, calibration=dataclasses.replace(base.calibration, mode=mode),
                               resources=Resources(gpus=gpus))


def solve_spans(job: Any) -> list[Any]:
    return [s for s in job.diagnostics.timeline if s.phase == "solve"]


def solve_phase_s(job: Any) -> float:
    """From the first solve's start to the last one's end: the solve phase as a union, not a sum."""
    spans = solve_spans(job)
    if not spans:
        return 0.0
    return max(s.start_s + s.duration_s for s in spans) - min(s.start_s for s in spans)


def artifact_digest(job: Any) -> str:
    """Each artifact's sha256 as the job reports it, and a sha256 over the bytes of its files (name order)
    but the manifest, whose diagnostics (timings, spans, the order blocks finished in) differ run to run."""
    parts = []
    for artifact in job.artifacts:
        files = hashlib.sha256()
        for path in sorted(p for p in Path(artifact.path).rglob("*") if p.is_file() and p.name != MANIFEST):
            files.update(path.relative_to(artifact.path).as_posix().encode())
            files.update(hashlib.sha256(path.read_bytes()).digest())
        parts.append(f"{artifact.sha256}:{files.hexdigest()}")
    return ";".join(parts)


def run_job(address: str, req: Any) -> tuple[Any, float]:
    """Submit one job and wait for its end; the job and its wall seconds."""
    from bitsmith.rpc import Client

    with Client(address, timeout=CALL_TIMEOUT_S) as client:
        t0 = time.perf_counter()
        job = client.submit(req).wait(check=False)
        return job, time.perf_counter() - t0


def parallel_job(address: str, req: Any) -> dict[str, Any]:
    job, wall_s = run_job(address, req)
    spans = solve_spans(job)
    return {"job": job.id, "state": job.state.value, "error": job.error or "", "wall_s": wall_s,
            "solve_s": solve_phase_s(job), "solve_busy_s": sum(s.duration_s for s in spans),
            "solves": len(spans), "solves_by_worker": dict(Counter(s.worker for s in spans)),
            "solvers": list(job.solvers), "digest": artifact_digest(job) if job.artifacts else ""}


def many_jobs(address: str, reqs: Sequence[Any]) -> dict[str, Any]:
    """Every request submitted at once (a client each); jobs that succeeded per minute, from the first submit
    to the last end."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(reqs)) as pool:
        done = list(pool.map(lambda r: run_job(address, r)[0], reqs))
    wall_s = time.perf_counter() - t0
    succeeded = sum(j.state.value == "succeeded" for j in done)
    return {"wall_s": wall_s, "jobs_per_min": 60 * succeeded / wall_s,
            "states": dict(Counter(j.state.value for j in done)),
            "errors": [f"{j.id}: {j.error}" for j in done if j.state.value != "succeeded"],
            "solvers": sorted({s for j in done for s in j.solvers}),
            "jobs_by_solvers": dict(Counter(",".join(j.solvers) for j in done))}


def target_line(result: dict[str, Any]) -> str:
    gpus = result["gpus"]
    if result["device"] != "cuda" or gpus < 2:
        return f"target: >= {TARGET}x on 2 GPUs for parallel-mode solves: not measurable here ({gpus} GPU)"
    met = result["parallel"]["solve_ratio"] >= TARGET
    return f"target: >= {TARGET}x on 2 GPUs for parallel-mode solves: {'MET' if met else 'NOT MET'}"


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    shape = SHAPES[args.shape]
    layers = args.layers or shape.layers
    model, warm_model, calib = work / "model", work / "model-warm-up", work / "calib.txt"
    t0 = time.perf_counter()
    write_checkpoint(model, shape, layers)
    write_tokenizer(model, shape.vocab)
    write_checkpoint(warm_model, shape, 1, seed=1)
    write_tokenizer(warm_model, shape.vocab)
    write_calibration_text(calib, shape.vocab, words=args.samples * args.seq_len + 4 * args.seq_len)
    print(f"checkpoint: {args.shape}-shaped, {layers} layers, built in {time.perf_counter() - t0:.1f} s", flush=True)

    result: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "hardware": f"{hardware()}; {gpu_line()}",
        "device": args.device, "gpus": gpus, "threads": args.threads, "shape": args.shape, "layers": layers,
        "samples": args.samples, "seq_len": args.seq_len, "jobs": args.jobs, "repeats": args.repeats,
    }
    with ExitStack() as stack:
        shared, solvers = stack.enter_context(services(work, args, gpus))
        addresses = {
            1: stack.enter_context(coordinator(work / "home-1", services_spec(shared, solvers[:1]), 1)),
            2: stack.enter_context(coordinator(work / "home-2", services_spec(shared, solvers), 2)),
        }
        result["solver_addresses"] = solvers
        print(f"solvers: {', '.join(solvers)}; coordinators: 1 replica {addresses[1]}, 2 replicas {addresses[2]}",
              flush=True)

        for n, address in addresses.items():
            warm, wall_s = run_job(address, request(warm_model, calib, work / f"out-warm-up-{n}", args,
                                                    parallel=True, gpus=n))
            print(f"warm-up on {n} replica(s): {warm.state.value} in {wall_s:.1f} s, solves by worker "
                  f"{dict(Counter(s.worker for s in solve_spans(warm)))}", flush=True)

        runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
        for r in range(args.repeats):
            for n, address in addresses.items():
                one = parallel_job(address, request(model, calib, work / f"out-parallel-{n}-{r}", args,
                                                    parallel=True, gpus=n))
                runs[n].append(one)
                print(f"parallel job on {n} replica(s): {one['state']} in {one['wall_s']:.1f} s, solve phase "
                      f"{one['solve_s']:.1f} s, solves by worker {one['solves_by_worker']}", flush=True)

        batches: dict[int, dict[str, Any]] = {}
        for n, address in addresses.items():
            reqs = [request(model, calib, work / f"out-small-{n}-{i}", args, parallel=False, gpus=1)
                    for i in range(args.jobs)]
            batches[n] = many_jobs(address, reqs)
            print(f"{args.jobs} jobs on {n} replica(s): {batches[n]['wall_s']:.1f} s, "
                  f"{batches[n]['jobs_per_min']:.2f} jobs/min, {batches[n]['states']}", flush=True)

    def median(n: int, key: str) -> float:
        return statistics.median(one[key] for one in runs[n])

    parallel = {f"{n}_replica": {"wall_s": median(n, "wall_s"), "solve_s": median(n, "solve_s"),
                                 "solve_busy_s": median(n, "solve_busy_s"), "runs": runs[n]} for n in (1, 2)}
    parallel["wall_ratio"] = parallel["1_replica"]["wall_s"] / parallel["2_replica"]["wall_s"]
    parallel["solve_ratio"] = parallel["1_replica"]["solve_s"] / max(parallel["2_replica"]["solve_s"], 1e-9)
    small = {f"{n}_replica": batches[n] for n in (1, 2)}
    small["ratio"] = batches[2]["jobs_per_min"] / max(batches[1]["jobs_per_min"], 1e-9)
    result.update(parallel=parallel, small=small)

    problems = [f"parallel job {one['job']} on {n} replica(s) ended {one['state']}: {one['error']}"
                for n in (1, 2) for one in runs[n] if one["state"] != "succeeded"]
    digests = {one["digest"] for n in (1, 2) for one in runs[n] if one["state"] == "succeeded"}
    if len(digests) > 1:
        problems.append(f"the parallel jobs' artifacts differ: {sorted(digests)}")
    problems += [f"small job {e}" for n in (1, 2) for e in batches[n]["errors"]]
    if set(batches[2]["solvers"]) != set(solvers):
        problems.append(f"the small jobs on 2 replicas used {batches[2]['solvers']}, not both of {solvers}")
    result["artifact_sha256"] = sorted(digests)
    result["checks"] = problems
    return result


def report(result: dict[str, Any]) -> None:
    p, s = result["parallel"], result["small"]
    print(f"# {result['hardware']}; {result['date']}")
    where = (f"{result['gpus']} GPU(s), solver i on GPU i % {result['gpus']}" if result["device"] == "cuda"
             else f"CPU, {result['threads']} torch thread(s) per solver")
    print(f"# {result['shape']}-shaped, {result['layers']} layers, GPTQ w4 g128 asym, "
          f"{result['samples']} x {result['seq_len']} calibration tokens; {where}")
    if result["device"] != "cuda" or result["gpus"] < 2:
        print(f"# NOTE: fewer than 2 GPUs ({result['gpus']}): both solvers share this host's "
              f"{'CPU' if result['device'] != 'cuda' else 'GPU'}; the ratios measure overlap, not scaling")
    print(f"{'':<44}{'1 replica':>12}{'2 replicas':>12}{'ratio':>8}")
    print(f"{'parallel-mode job, wall s':<44}{p['1_replica']['wall_s']:>12.2f}{p['2_replica']['wall_s']:>12.2f}"
          f"{p['wall_ratio']:>7.2f}x")
    print(f"{'parallel-mode job, solve phase s':<44}{p['1_replica']['solve_s']:>12.2f}"
          f"{p['2_replica']['solve_s']:>12.2f}{p['solve_ratio']:>7.2f}x")
    print(f"{'parallel-mode job, solve calls s (sum)':<44}{p['1_replica']['solve_busy_s']:>12.2f}"
          f"{p['2_replica']['solve_busy_s']:>12.2f}")
    jobs = f"{result['jobs']} sequential jobs"
    print(f"{jobs + ', wall s':<44}{s['1_replica']['wall_s']:>12.2f}{s['2_replica']['wall_s']:>12.2f}"
          f"{s['1_replica']['wall_s'] / s['2_replica']['wall_s']:>7.2f}x")
    print(f"{jobs + ', jobs/min':<44}{s['1_replica']['jobs_per_min']:>12.2f}"
          f"{s['2_replica']['jobs_per_min']:>12.2f}{s['ratio']:>7.2f}x")
    print(f"parallel jobs' artifacts: {', '.join(d[:16] for d in result['artifact_sha256'])} "
          f"({'bitwise equal' if len(result['artifact_sha256']) == 1 else 'DIFFER'})")
    print(f"small jobs on 2 replicas, by replica set: {s['2_replica']['jobs_by_solvers']}")
    print(target_line(result))
    for problem in result["checks"]:
        print(f"FAILED: {problem}")
    print("checks: " + ("every job succeeded, equal artifacts on 1 and 2 replicas, both replicas used"
                        if not result["checks"] else f"{len(result['checks'])} problems"), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the calibrator and solvers compute (auto: cuda when torch sees a GPU)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads of each solver (default: half the logical CPUs)")
    parser.add_argument("--calibrator-gpu", type=int, default=0, help="the calibrator's GPU on a CUDA host")
    parser.add_argument("--shape", choices=["tiny", "8b"], default="tiny")
    parser.add_argument("--layers", type=int, default=0, help="blocks to build (default: the shape's own)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--jobs", type=int, default=8, help="small jobs submitted at once")
    parser.add_argument("--repeats", type=int, default=1, help="parallel-mode jobs per configuration (median)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < 2:
        print(f"NOTE: {torch.cuda.device_count()} GPU here: both solvers share it; the numbers measure overlap, "
              "not scaling", flush=True)
    if args.device == "cpu":
        print(f"NOTE: no GPU in use: both solvers share the CPU ({args.threads} thread(s) each); the numbers "
              "measure overlap, not scaling", flush=True)
    with ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bitsmith-scale-")))
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 1 if result["checks"] else 0


if __name__ == "__main__":
    sys.exit(main())

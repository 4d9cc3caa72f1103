"""A whole model through the services on one GPU: a Llama-3-8B-shaped checkpoint (or one 70B-shaped block).

Writes a random-weight checkpoint of the chosen shape (bf16 safetensors, one shard per block, a
config.json and a word-level tokenizer whose words are the token ids, with a calibration text of
random words, so calibration windows are random token ids drawn through the calibrator's own path),
starts the calibrator, solver, packer and runtimes as plain `bitsmith serve` processes (static
placement, no Ray), runs the coordinator in this process and submits one sequential GPTQ job (w4 g128
asym, GPTQ v2 checkpoint), then prints:

- wall seconds split into calibration forward (the calibrator's Start, Collect and Advance steps:
  embedding, block forwards, Hessian capture), solve and pack (pack and publish), read off the job's
  progress events (each event starts a step, the next one ends it), with per-block medians;
- each service's seconds per call kind (median over blocks after the first), the calibrator's split of
  each Collect and Advance (fetching inputs, forward, storing what it made) and the packer's split
  of its Pack call (reading the solved weights, writing the format, writing the manifest), from the
  end-of-call lines the services log;
- each compute service's peak GPU memory (`torch.cuda.max_memory_allocated`, which the services log
  after every call), after the first block and at the end: equal numbers mean the peak follows one
  block, not the model's depth;
- the hardware.

    python bench/quantize_model.py [--shape 8b|70b|tiny] [--layers N] [--samples 128] [--seq-len 2048]
                                   [--activations device|host|store] [--matmul-precision high|highest|bfloat16]
                                   [--no-true-sequential] [--solvers N] [--json PATH] [--work DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from machine import hardware


@dataclass(frozen=True, slots=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


SHAPES = {
    "8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256),
    "70b": Shape(hidden=8192, layers=80, heads=64, kv_heads=8, ffn=28672, vocab=128256),
    "tiny": Shape(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, vocab=1024),
}
WORKERS = ("calibrator", "solver", "packer", "runtime_cpu", "runtime_apple", "runtime_nvidia")
BLOCK_PHASE = {"calibrate": "calibration", "advance": "calibration", "solve": "solve"}
WEIGHT_STD = 0.02


def write_checkpoint(out: Path, shape: Shape, layers: int, seed: int = 0) -> int:
    """A random-weight Llama checkpoint of `shape` with `layers` blocks, bf16, one shard per block; its bytes."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * WEIGHT_STD).to(torch.bfloat16).cpu()

    shards: dict[str, dict[str, torch.Tensor]] = {
        "embed.safetensors": {"model.embed_tokens.weight": normal(shape.vocab, shape.hidden),
                              "lm_head.weight": normal(shape.vocab, shape.hidden),
                              "model.norm.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)},
    }
    linears = {"self_attn.q_proj": (shape.hidden, shape.hidden), "self_attn.k_proj": (kv, shape.hidden),
               "self_attn.v_proj": (kv, shape.hidden), "self_attn.o_proj": (shape.hidden, shape.hidden),
               "mlp.gate_proj": (shape.ffn, shape.hidden), "mlp.up_proj": (shape.ffn, shape.hidden),
               "mlp.down_proj": (shape.hidden, shape.ffn)}
    weight_map: dict[str, str] = {}
    total = 0
    for name, tensors in shards.items():
        save_file(tensors, str(out / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    for bid in range(layers):
        prefix = f"model.layers.{bid}."
        tensors = {f"{prefix}{n}.weight": normal(*size) for n, size in linears.items()}
        tensors |= {f"{prefix}{n}.weight": torch.ones(shape.hidden, dtype=torch.bfloat16)
                    for n in ("input_layernorm", "post_attention_layernorm")}
        name = f"block-{bid:03d}.safetensors"
        save_file(tensors, str(out / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn, "num_hidden_layers": layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }))
    if device == "cuda":
        torch.cuda.empty_cache()
    return total


def write_tokenizer(model_dir: Path, vocab: int) -> None:
    """A word-level tokenizer whose word `t<i>` is token id i: random words are random token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0").save_pretrained(str(model_dir))


def write_calibration_text(path: Path, vocab: int, words: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (words,), generator=gen).tolist()
    path.write_text(" ".join(f"t{i}" for i in ids) + "\n", encoding="utf-8")


@contextmanager
def worker_services(work: Path, activations: str, precision: str = "high", solvers: int = 1
                    ) -> Iterator[dict[str, str]]:
    """Every worker service as a `bitsmith serve` process, `solvers` solver replicas (`solver`, `solver-2`,
    ...); yields name -> address, stops them on exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    procs: list[tuple[subprocess.Popen[str], IO[str]]] = []
    addresses: dict[str, str] = {}
    names = [(role, role) for role in WORKERS] + [("solver", f"solver-{i}") for i in range(2, solvers + 1)]
    try:
        for role, name in names:
            cmd = [sys.executable, "-m", "bitsmith_services.cli", "serve", role, "--store", str(work / "store")]
            if role == "calibrator":
                cmd += ["--activations", activations, "--matmul-precision", precision]
            log: IO[str] = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
            procs.append((proc, log))
            line = proc.stdout.readline().strip() if proc.stdout else ""
            if not line:
                raise SystemExit(f"{name} did not start; see {work / f'{name}.log'}")
            addresses[name] = line
        yield addresses
    finally:
        for proc, log in procs:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                # Aborted instead: with faulthandler on (set below) its threads' stacks land in its log.
                proc.send_signal(signal.SIGABRT)
                proc.wait(timeout=60)
                print(f"{Path(log.name).stem} did not stop within 60 s of SIGTERM; aborted, see {log.name}",
                      file=sys.stderr, flush=True)
            log.close()


def call_lines(log: Path) -> list[dict[str, Any]]:
    """Every end-of-call line a service logged (its rpc, block, linears, seconds, peak), in order."""
    out = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "seconds" in entry and "rpc" in entry:
            out.append(entry)
    return out


def peaks(calls: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """(block, peak bytes) of every call that logged the device's peak memory, in order."""
    return [(int(c.get("block", -1)), int(c["peak_gpu_bytes"])) for c in calls if "peak_gpu_bytes" in c]


def call_medians(calls: list[dict[str, Any]], field: str | None = None) -> dict[str, float]:
    """Median seconds inside the service per call kind (``Collect q_proj+k_proj+v_proj``, ``Advance``,
    ``Solve down_proj``) over blocks after the first, which pays one-time costs (allocations, warm-up);
    with `field`, of that phase of the calls that logged it (``Collect down_proj forward``)."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    later = [c for c in calls if int(c.get("block", -1)) > 0] or calls
    for c in later:
        names = "+".join(n.rsplit(".", 1)[-1] for n in c.get("linears", []))
        kind = f"{c['rpc']} {names}".strip()
        if field is None:
            by_kind[kind].append(float(c["seconds"]))
        else:
            for phase, seconds in c.get(field, {}).items():
                by_kind[f"{kind} {phase}"].append(float(seconds))
    return {kind: statistics.median(v) for kind, v in by_kind.items()}


def job_request(model_dir: Path, calib: Path, out: Path, samples: int, seq_len: int, *,
                true_sequential: bool = True, asymmetric_calibration: bool = False, solvers: int = 1) -> Any:
    """GPTQ w4 g128 asym in column order (the options the recorded numbers used), a GPTQ v2 checkpoint;
    without `true_sequential`, one Collect per block captures every group's Hessian from one forward;
    with `asymmetric_calibration` the float model's stream runs beside the quantized one; the job leases
    `solvers` solver replicas."""
    from bitsmith.recipes import Recipe
    from bitsmith.rpc import Calibration, QuantizeRequest, Resources
    from bitsmith.schemes import GPTQOptions, Method, QuantScheme

    recipe = Recipe(method=Method.GPTQ, scheme=QuantScheme(bits=4, group_size=128),
                    gptq=GPTQOptions(damp_percent=0.01, act_order=False, static_groups=False,
                                      true_sequential=true_sequential,
                                      asymmetric_calibration=asymmetric_calibration))
    return QuantizeRequest(model=model_dir, out=out, recipe=recipe, checkpoint_format="gptq_v2",
                           calibration=Calibration(files=[calib], samples=samples, seq_len=seq_len, seed=0),
                           resources=Resources(gpus=solvers))


def phase_seconds(events: list[Any]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Seconds per phase and, for calibration and solve, per block.

    A block step lasts from its event to the next one (the loop announces a step, then runs it);
    `start` is from the job's start to its first block step (planning, tokenizing, embedding);
    `pack` is from the last block's end to the publish event (the packer reports after the fact).
    """
    def at(event: Any) -> float:
        return float(event.time.timestamp())

    total: dict[str, float] = defaultdict(float)
    per_block: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for event, after in itertools.pairwise(events):
        phase = BLOCK_PHASE.get(event.phase)
        if phase is not None:
            total[phase] += at(after) - at(event)
            per_block[phase][event.block] += at(after) - at(event)
    first_block = next(e for e in events if e.phase in BLOCK_PHASE)
    last_done = [e for e in events if e.phase == "done" and e.block is not None][-1]
    total["start"] = at(first_block) - at(next(e for e in events if e.phase == "start"))
    total["pack"] = at([e for e in events if e.phase == "publish"][-1]) - at(last_done)
    return dict(total), {phase: list(blocks.values()) for phase, blocks in per_block.items()}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bitsmith.rpc import Client
    from bitsmith_services.coordinator.placement import ServiceAddresses, Worker
    from bitsmith_services.registry import Role
    from bitsmith_services.stack import LocalStack

    shape = SHAPES[args.shape]
    layers = args.layers or shape.layers
    model_dir = work / "model"
    t0 = time.perf_counter()
    checkpoint_bytes = write_checkpoint(model_dir, shape, layers)
    write_tokenizer(model_dir, shape.vocab)
    calib = work / "calib.txt"
    write_calibration_text(calib, shape.vocab, words=args.samples * args.seq_len + 4 * args.seq_len)
    build_s = time.perf_counter() - t0
    print(f"checkpoint: {args.shape}-shaped, {layers} layers, {checkpoint_bytes / 2**30:.1f} GiB bf16, "
          f"built in {build_s:.1f} s", flush=True)
    with ExitStack() as stack:
        addresses = stack.enter_context(worker_services(work, args.activations, args.matmul_precision, args.solvers))
        services = ServiceAddresses({role: addresses[role.value] for role in Role},
                                    solvers=tuple(Worker(a) for n, a in addresses.items() if n.startswith("solver")))
        local = stack.enter_context(LocalStack(home=work / "home", services=services))
        client = stack.enter_context(Client(local.address))
        t0, submitted = time.perf_counter(), time.time()
        job = client.submit(job_request(model_dir, calib, work / "out", args.samples, args.seq_len,
                                       true_sequential=not args.no_true_sequential,
                                       asymmetric_calibration=args.asymmetric_calibration, solvers=args.solvers))
        events = []
        for event in job.watch():
            events.append(event)
            if event.phase == "done":
                print(f"  {event.message} at {time.perf_counter() - t0:.1f} s", flush=True)
        wall_s = time.perf_counter() - t0
        job = job.wait()
        # Read before the services stop: a worker that hangs on the way out must not cost the numbers.
        result = _result(args, layers, checkpoint_bytes, build_s, wall_s, events, job, work)
        # Submit itself (the calibrator's Plan: opening and checking the checkpoint) and the queue, which
        # the job's own phases do not show: from the call to the job's start.
        result["seconds"]["submit"] = next(e for e in events if e.phase == "start").time.timestamp() - submitted
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def _result(args: argparse.Namespace, layers: int, checkpoint_bytes: int, build_s: float, wall_s: float,
            events: list[Any], job: Any, work: Path) -> dict[str, Any]:
    seconds, per_block = phase_seconds(events)
    result: dict[str, Any] = {
        "shape": args.shape, "layers": layers, "samples": args.samples, "seq_len": args.seq_len,
        "activations": args.activations, "matmul_precision": args.matmul_precision, "solvers": args.solvers,
        "true_sequential": not args.no_true_sequential, "asymmetric_calibration": args.asymmetric_calibration,
        "checkpoint_gib": checkpoint_bytes / 2**30, "build_s": build_s,
        "job_wall_s": wall_s, "seconds": seconds,
        "per_block_median_s": {phase: statistics.median(v) for phase, v in per_block.items() if v},
        "artifact_bytes": sum(a.bytes for a in job.artifacts), "hardware": hardware(),
        # What the job recorded about itself (the report's numbers): its phases and each service's device,
        # busy seconds and peak memory, and the held-out output error of each block.
        "job_phases_s": {p.phase: p.seconds for p in job.diagnostics.phases},
        "job_services": {s.service: {"device": s.usage.device, "busy_s": s.busy_s,
                                     "peak_device_gib": s.usage.peak_device_bytes / 2**30,
                                     "peak_host_gib": s.usage.peak_host_bytes / 2**30}
                         for s in job.diagnostics.services},
        "block_output_error": [b.output_error for b in job.diagnostics.blocks],
        "timeline": [[s.name, s.block, round(s.start_s, 4), round(s.duration_s, 4)] for s in job.diagnostics.timeline],
    }
    result["pack_calls"] = call_lines(work / "packer.log")
    for role in ("calibrator", "solver"):
        # A role's replicas (solver, solver-2, ...): calls pooled, peaks summed (they share the one GPU).
        logs = [call_lines(log) for log in sorted(work.glob(f"{role}*.log"))]
        calls = [call for lines in logs for call in lines]
        result[f"{role}_call_median_s"] = call_medians(calls)
        result[f"{role}_phase_median_s"] = call_medians(calls, "phases")
        result[f"{role}_peak_gib"] = sum(max((p for _, p in peaks(lines)), default=0) for lines in logs) / 2**30
        result[f"{role}_peak_after_block0_gib"] = sum(
            max((p for block, p in peaks(lines) if block == 0), default=0) for lines in logs) / 2**30
    return result


def block_split(timeline: list[list[Any]]) -> dict[int, dict[str, float]]:
    """Per block, from the coordinator's timeline of calls: its wall seconds (first call's start to last
    call's end), the seconds of each call kind, and what no call covers (`gaps`: the loop's own time)."""
    spans: dict[int, list[tuple[str, float, float]]] = defaultdict(list)
    for name, block, start, duration in timeline:
        if block >= 0:
            spans[block].append((name, start, start + duration))
    out: dict[int, dict[str, float]] = {}
    for block, calls in sorted(spans.items()):
        split: dict[str, float] = defaultdict(float)
        for name, start, end in calls:
            split[name] += end - start
        wall = max(end for _, _, end in calls) - min(start for _, start, _ in calls)
        out[block] = {"wall": wall, **split, "gaps": wall - sum(split.values())}
    return out


def report(result: Mapping[str, Any]) -> None:
    s = result["seconds"]
    print(f"# {result['hardware']}")
    print(f"# {result['shape']}-shaped, {result['layers']} layers ({result['checkpoint_gib']:.1f} GiB bf16), "
          f"GPTQ w4 g128 asym, {result['samples']} x {result['seq_len']} calibration tokens, "
          f"activations in {result['activations']}, calibrator matmuls {result['matmul_precision']}, "
          f"{'true-sequential' if result.get('true_sequential', True) else 'one Collect per block'}"
          f"{', asymmetric calibration' if result.get('asymmetric_calibration') else ''}")
    print(f"{'job wall s':>11} {'submit s':>9} {'start s':>8} {'calib s':>8} {'solve s':>8} {'pack s':>7} "
          f"{'calib/blk':>10} {'solve/blk':>10} {'calibrator GiB':>15} {'solver GiB':>11}")
    med = result["per_block_median_s"]
    print(f"{result['job_wall_s']:11.1f} {s.get('submit', 0):9.1f} {s.get('start', 0):8.1f} "
          f"{s.get('calibration', 0):8.1f} {s.get('solve', 0):8.1f} {s.get('pack', 0):7.1f} "
          f"{med.get('calibration', 0):10.2f} "
          f"{med.get('solve', 0):10.2f} {result['calibrator_peak_gib']:15.2f} {result['solver_peak_gib']:11.2f}")
    print(f"peak after block 0: calibrator {result['calibrator_peak_after_block0_gib']:.2f} GiB, "
          f"solver {result['solver_peak_after_block0_gib']:.2f} GiB")
    for role in ("calibrator", "solver"):
        print(f"{role} s per call (median): " + ", ".join(
            f"{kind} {s:.2f}" for kind, s in result[f"{role}_call_median_s"].items()))
        if result[f"{role}_phase_median_s"]:
            print(f"{role} s per call phase (median): " + ", ".join(
                f"{kind} {s:.2f}" for kind, s in result[f"{role}_phase_median_s"].items()))
    for call in result["pack_calls"]:
        print(f"pack {call['format']}: read {call['read_seconds']:.1f} s, write {call['write_seconds']:.1f} s, "
              f"manifest {call['manifest_seconds']:.1f} s", flush=True)
    print("job diagnostics: " + ", ".join(f"{phase} {s:.1f} s" for phase, s in result["job_phases_s"].items()))
    for service, u in result["job_services"].items():
        print(f"  {service}: {u['device']}, busy {u['busy_s']:.1f} s, peak device {u['peak_device_gib']:.2f} GiB, "
              f"peak host {u['peak_host_gib']:.2f} GiB")
    for block, split in block_split(result["timeline"]).items():
        print(f"  block {block}: " + ", ".join(f"{kind} {s:.2f}" for kind, s in split.items()))
    print("  held-out block output error: " + " ".join(f"{e:.3f}" for e in result["block_output_error"]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=0, help="blocks to build (default: the shape's own)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--activations", choices=["device", "host", "store"], default="device")
    parser.add_argument("--matmul-precision", choices=["high", "highest", "bfloat16"], default="high",
                        help="the calibrator's forwards and products: float32 with TensorFloat-32 (high), "
                             "exact float32 (highest) or bfloat16 forwards")
    parser.add_argument("--no-true-sequential", action="store_true",
                        help="one Collect per block (every group's statistics from the float block) instead of one "
                             "per group with the block's earlier groups quantized")
    parser.add_argument("--asymmetric-calibration", action="store_true",
                        help="run the float model's stream beside the quantized one (cross statistics)")
    parser.add_argument("--solvers", type=int, default=1,
                        help="solver replicas on the one GPU: solves of a block's groups overlap (each is partly "
                             "host work: reading its Hessian, writing its codes)")
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("--work", help="work directory (default: a temporary one, removed afterwards)")
    args = parser.parse_args()
    with ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="bitsmith-bench-")))
        result = run(args, work)
    report(result)


if __name__ == "__main__":
    main()

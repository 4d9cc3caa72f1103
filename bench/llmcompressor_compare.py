"""bitsmith vs llm-compressor on the CPU: GPTQ and AWQ on the demo model, same tokens, same scheme.

Runs, one job after the other on this machine, alternating the tools (for each bit width and method:
llm-compressor's job, then bitsmith's):
  llm-compressor: `bench/llmcompressor_run.py quantize` in its own venv (`.cache/llmcompressor-venv`,
                  created on first use from `bench/llmcompressor-requirements.txt`): `oneshot` with
                  GPTQModifier, or AWQModifier + QuantizationModifier, saving a compressed-tensors
                  "pack-quantized" checkpoint;
  bitsmith:       `bitsmith quantize --method gptq|awq --format compressed-tensors --format gptq` (an
                  embedded stack of its own per job, unless --server is given).
Both calibrate on the same token ids: `calibration_tokens(DEMO_MODEL, CALIB_FILES, samples, seq_len,
seed=0)`, computed here and handed to llm-compressor as a safetensors file (bitsmith's calibrator draws
the identical windows from the same files and seed). The scheme is int, asymmetric, one grid per
`--group-size` inputs of every Linear but lm_head; every other knob is each tool's default (the
`--llmc-arg` / `--bitsmith-arg` flags pass more). *wall s* is each job's process, start to exit, as a
user runs it (interpreter start, imports, model load, calibration, solve, save; for bitsmith the
embedded stack's start too); *job s* is the work inside it: llm-compressor's model load + `oneshot` +
save, bitsmith's submit to done (the extent of the job's trace, `BITSMITH_TRACE_FILE`). With
`--repeats N` every job runs N times, interleaved, and the fastest run is reported; `--reuse DIR` reads
the llm-compressor jobs an earlier `--keep DIR` recorded instead of running them again (its AWQ takes
~20 minutes on 2 cores).

Every checkpoint is then evaluated by bitsmith's evaluator (`bitsmith.runtimes.evaluate_path`: the
format's reader, perplexity on eval-prose and eval-code, KL and top-1 against the unquantized model).
llm-compressor's checkpoints are read by bitsmith's compressed-tensors reader; as a cross-check they are
also dequantized by compressed-tensors itself (in the llm-compressor venv) and the two weight sets
compared; were bitsmith's reader to refuse one, that row is scored from the compressed-tensors
dequantization instead and marked so. Prints the hardware, the versions and one table.

    python bench/llmcompressor_compare.py [--bits 4] [--bits 3] [--methods gptq,awq] [--samples 128]
        [--seq-len 512] [--repeats 1] [--bitsmith-arg=--act-order ...] [--llmc-arg=--dtype=bfloat16 ...]
        [--keep DIR] [--reuse DIR] [--json FILE]

The venv, by hand (what the script does when it is missing):
    python -m venv .cache/llmcompressor-venv && .cache/llmcompressor-venv/bin/pip install pip==25.3 \
        && .cache/llmcompressor-venv/bin/pip install -r bench/llmcompressor-requirements.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from machine import hardware

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".cache" / "llmcompressor-venv"
REQUIREMENTS = REPO / "bench" / "llmcompressor-requirements.txt"
RUNNER = REPO / "bench" / "llmcompressor_run.py"
STAMP = "bitsmith-requirements.sha256"
PIP = "pip==25.3"
CPU_ONLY_EXCEPTIONS = ("nvidia-ml-py",)
"""nvidia-* distributions that are not CUDA libraries (NVML's pure-Python bindings, an llm-compressor dependency)."""


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# --- the llm-compressor venv -------------------------------------------------------------------------

def venv_python() -> Path:
    return VENV / "bin" / "python"


def runner(*args: str) -> list[str]:
    """The command running `bench/llmcompressor_run.py` in the venv. `-P`: without the script's folder on
    sys.path, since bench/ holds modules whose names libraries import optionally (transformers tries
    `import kernels`, and bench/kernels.py is not Hugging Face's package)."""
    return [str(venv_python()), "-P", str(RUNNER), *args]


def _pip(*args: str) -> list[str]:
    return [str(venv_python()), "-m", "pip", "--disable-pip-version-check", *args]


def _refuse_cuda_resolution() -> None:
    """Resolve the requirements without installing; refuse if torch would come with CUDA libraries."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(_pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                            "-r", str(REQUIREMENTS)), check=True)
        names = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                 for item in json.loads(report.read_text())["install"]}
    cuda = sorted(n for n in names if (n.startswith("nvidia-") and n not in CPU_ONLY_EXCEPTIONS) or n == "triton")
    if cuda:
        raise SystemExit(f"the requirements resolve to torch {names.get('torch')} with CUDA packages "
                         f"({', '.join(cuda)}); point pip at a CPU build of torch, e.g. "
                         "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu")


def ensure_venv() -> None:
    """Create or update `.cache/llmcompressor-venv` from the pinned requirements; check it is CPU-only."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = VENV / STAMP
    if venv_python().is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return
    if not venv_python().is_file():
        print(f"creating the llm-compressor venv in {VENV.relative_to(REPO)} …", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(_pip("install", "--quiet", PIP), check=True)
    _refuse_cuda_resolution()
    subprocess.run(_pip("install", "--quiet", "-r", str(REQUIREMENTS)), check=True)
    check = ("import torch, importlib.metadata as m; "
             "assert torch.version.cuda is None, torch.__version__; "
             "names = [d.metadata['Name'].lower() for d in m.distributions()]; "
             f"bad = [n for n in names if n.startswith('nvidia-') and n not in {CPU_ONLY_EXCEPTIONS!r}]; "
             "assert not bad, bad")
    subprocess.run([str(venv_python()), "-c", check], check=True)
    stamp.write_text(digest + "\n")


def llmc_versions() -> dict[str, str]:
    code = ("import json, platform; from importlib import metadata as m; import torch; "
            "print(json.dumps({'llmcompressor': m.version('llmcompressor'), "
            "'compressed-tensors': m.version('compressed-tensors'), 'torch': torch.__version__, "
            "'torch.cuda': str(torch.version.cuda), 'transformers': m.version('transformers'), "
            "'python': platform.python_version()}))")
    out = subprocess.run([str(venv_python()), "-c", code], check=True, capture_output=True, text=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main_versions() -> dict[str, str]:
    import torch

    out = {"bitsmith": metadata.version("bitsmith"), "torch": torch.__version__,
           "transformers": metadata.version("transformers")}
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        out["commit"] = head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        pass
    return out


# --- jobs ----------------------------------------------------------------------------------------------

@dataclass
class Job:
    tool: str
    method: str
    bits: int
    runs: list[dict[str, float]] = field(default_factory=list)
    """One entry per successful repeat: wall, core (seconds) and the 1-minute load average at its start."""
    checkpoint: Path | None = None
    extra_artifacts: dict[str, Path] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    scored_from: str = ""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{'llmc' if self.tool == 'llm-compressor' else self.tool}-{self.method}-w{self.bits}"

    def _best(self, key: str) -> float:
        return min((r[key] for r in self.runs), default=float("nan"))

    @property
    def wall_s(self) -> float:
        return self._best("wall")

    @property
    def core_s(self) -> float:
        return self._best("core")


def _run_logged(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, str]:
    """Run `cmd` with stdout/stderr to `log`; (exit code, wall seconds, stdout's last line), also recorded in
    `<log>.run.json` with the load average at the start, for `--reuse`."""
    load = load_average()
    start = time.perf_counter()
    with log.open("w") as sink:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sink, text=True, env=env, cwd=REPO)
        sink.write("\n--- stdout ---\n" + proc.stdout)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    last = lines[-1] if lines else ""
    _record(log).write_text(json.dumps({"code": proc.returncode, "wall": wall, "load": load, "last": last}))
    return proc.returncode, wall, last


def _record(log: Path) -> Path:
    return log.with_name(log.name + ".run.json")


def _job_run(cmd: list[str], args: argparse.Namespace, work: Path, name: str, *, reusable: bool = False,
             env: dict[str, str] | None = None) -> tuple[Path, int, float, float, str]:
    """Run one quantization job, or, `reusable` ones, take it from `--reuse DIR` where that holds a record of it;
    returns (the directory its outputs are in, exit code, wall seconds, load average at its start, stdout's last
    line)."""
    if reusable and args.reuse is not None and _record(args.reuse / f"{name}.log").is_file():
        rec = json.loads(_record(args.reuse / f"{name}.log").read_text())
        print(f"    reusing {args.reuse / name} (recorded)", file=sys.stderr, flush=True)
        return args.reuse, int(rec["code"]), float(rec["wall"]), float(rec.get("load", float("nan"))), rec["last"]
    code, wall, last = _run_logged(cmd, work / f"{name}.log", env=env)
    return work, code, wall, json.loads(_record(work / f"{name}.log").read_text())["load"], last


def _tail(log: Path) -> str:
    """The exception a failed process's log ends with, else its last line."""
    text = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    text = [line for line in text if not line.startswith("---")]
    errors = [line for line in text if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    return (errors or text or ["(empty log)"])[-1][:300]


def run_llmcompressor(job: Job, args: argparse.Namespace, work: Path, tokens: Path, attempt: int) -> None:
    from bitsmith.demo import DEMO_MODEL

    name = job.name + (f"-r{attempt}" if attempt else "")
    out, result = work / name, work / f"{name}.json"
    cmd = runner("quantize", "--model", str(DEMO_MODEL), "--tokens", str(tokens),
                 "--method", job.method, "--bits", str(job.bits), "--group-size", str(args.group_size),
                 "--out", str(out), "--result", str(result), *args.llmc_arg)
    where, code, wall, load, _ = _job_run(cmd, args, work, name, reusable=True)
    if code != 0:
        job.error = f"exit {code}: {_tail(where / f'{name}.log')}"
        return
    detail = json.loads((where / result.name).read_text())
    job.runs.append({"wall": wall, "core": float(detail["seconds"]["total"]), "load": load})
    if job.checkpoint is None:
        job.checkpoint, job.detail = where / out.name, detail


def run_bitsmith(job: Job, args: argparse.Namespace, work: Path, attempt: int) -> None:
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL

    name = job.name + (f"-r{attempt}" if attempt else "")
    exe = Path(sys.executable).with_name("bitsmith")
    cmd = [str(exe) if exe.is_file() else "bitsmith", "quantize", str(DEMO_MODEL), "--method", job.method,
           "--bits", str(job.bits), "--group-size", str(args.group_size),
           *(a for f in CALIB_FILES for a in ("--calib", str(f))), "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--seed", "0",
           *(a for f in args.bitsmith_format for a in ("--format", f)), "--out", str(work / name), "--json",
           *args.bitsmith_arg]
    env = dict(os.environ)
    spans = work / f"{name}.spans.jsonl"
    env["BITSMITH_TRACE_FILE"] = str(spans)
    if args.server:
        cmd += ["--server", args.server]
    else:  # never a stack `bitsmith up` left running for other work: an embedded one of this job's own
        env["BITSMITH_HOME"] = str(work / f"{name}.home")
    where, code, wall, load, last = _job_run(cmd, args, work, name, env=env)
    spans = where / spans.name
    try:
        summary = json.loads(last)
    except json.JSONDecodeError:
        summary = {}
    if code != 0 or summary.get("state") != "succeeded":
        job.error = summary.get("error") or f"exit {code}: {_tail(where / f'{name}.log')}"
        return
    job.runs.append({"wall": wall, "core": job_span_seconds(spans), "load": load})
    if job.checkpoint is None:
        artifacts = {a["format"]: Path(a["path"]) for a in summary["artifacts"]}
        first = args.bitsmith_format[0]
        job.checkpoint = artifacts.pop(first)
        job.extra_artifacts = artifacts
        job.detail = {"job_id": summary["job_id"], "formats": [first, *artifacts]}


def job_span_seconds(spans: Path) -> float:
    """Submit to done: the extent of every span the job's trace file holds (the CLI's Submit and Watch, the job's
    own trace through the services). The file is the job's alone, so stack start and CLI imports are outside."""
    from bitsmith.telemetry import read_spans

    if not spans.is_file():
        return float("nan")
    mine = [s for s in read_spans(str(spans)) if s.get("start_ns") and s.get("end_ns")]
    if not mine:
        return float("nan")
    return (max(int(str(s["end_ns"])) for s in mine) - min(int(str(s["start_ns"])) for s in mine)) / 1e9


# --- scoring -------------------------------------------------------------------------------------------

def dense_weights(path: Path) -> dict[str, Any]:
    """The float weights bitsmith reads from an artifact or a checkpoint directory."""
    from bitsmith.formats import get_format
    from bitsmith.runtimes import artifact_format
    from safetensors.torch import load_file

    fmt = artifact_format(path)
    if fmt is None:
        tensors: dict[str, Any] = {}
        for file in sorted(path.glob("*.safetensors")):
            tensors.update(load_file(file))
        return tensors
    return dict(get_format(fmt).read(path).dense_state_dict())


def max_weight_difference(a: Path, b: Path) -> tuple[float, int]:
    """Largest |Δ| over the 2-D weights the two share, and how many they share."""
    wa, wb = dense_weights(a), dense_weights(b)
    shared = [k for k in wa if k in wb and k.endswith(".weight") and wa[k].ndim == 2 and "embed" not in k]
    worst = max((float((wa[k].float() - wb[k].float()).abs().max()) for k in shared), default=float("nan"))
    return worst, len(shared)


def ct_decompress(checkpoint: Path, out: Path, log: Path) -> Path | None:
    """compressed-tensors' own dequantization of `checkpoint` (in the llm-compressor venv), or None."""
    code, _, _ = _run_logged(runner("decompress", "--checkpoint", str(checkpoint), "--out", str(out)), log)
    return out if code == 0 else None


def _is_compressed_tensors(path: Path) -> bool:
    config = json.loads((path / "config.json").read_text())
    return bool(config.get("quantization_config", {}).get("quant_method") == "compressed-tensors")


def score(job: Job, args: argparse.Namespace, work: Path) -> None:
    from bitsmith.demo import DEMO_MODEL, EVAL_FILES
    from bitsmith.runtimes import evaluate_path

    if job.checkpoint is None:
        return
    name = job.name
    path, job.scored_from = job.checkpoint, "bitsmith reader"
    if args.cross_check and _is_compressed_tensors(job.checkpoint):
        dense = ct_decompress(job.checkpoint, work / f"{name}.ct-dense", work / f"{name}.ct-dense.log")
        if dense is None:
            job.notes.append(f"compressed-tensors could not dequantize it: {_tail(work / f'{name}.ct-dense.log')}")
        else:
            try:
                diff, count = max_weight_difference(job.checkpoint, dense)
                job.notes.append(f"max |ΔW| bitsmith reader vs compressed-tensors {diff:.1e} ({count} linears)")
            except Exception as exc:  # any refusal of bitsmith's reader is the finding
                job.notes.append(f"bitsmith's reader refused it ({type(exc).__name__}: {exc}); scored from "
                                 "compressed-tensors' dequantization")
                path, job.scored_from = dense, "compressed-tensors dequantization"
    for fmt, other in job.extra_artifacts.items():
        try:
            diff, count = max_weight_difference(job.checkpoint, other)
            job.notes.append(f"{fmt} artifact vs {job.detail['formats'][0]}: max |ΔW| {diff:.1e} ({count} linears)")
        except Exception as exc:
            job.notes.append(f"{fmt} artifact unreadable: {type(exc).__name__}: {exc}")
    try:
        results = evaluate_path(path, list(EVAL_FILES), seq_len=args.eval_seq_len, reference=DEMO_MODEL)
    except Exception as exc:
        job.error = f"evaluation failed: {type(exc).__name__}: {exc}"
        return
    for r in results:
        job.metrics[Path(r.dataset).stem.removeprefix("eval-")] = {
            "ppl": r.ppl, "kl": r.kl or float("nan"), "top1": r.top1 or float("nan"),
            "reference_ppl": r.reference_ppl or float("nan"), "tokens": r.tokens}


# --- report --------------------------------------------------------------------------------------------

NONE = "-"


def _seconds(x: float) -> str:
    return f"{x:.1f}" if x == x else NONE


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and b == b and a == a else NONE


def table(jobs: list[Job]) -> list[str]:
    ref = next((j.metrics for j in jobs if j.metrics), None)
    head = ("| tool | method | bits | wall s | job s | ppl prose | ppl code | KL prose | KL code | top-1 prose "
            "| top-1 code | +ppl prose | +ppl code |")
    lines = [head, "|" + "---|" * 3 + "---:|" * 10]
    if ref:
        cells = ["unquantized (bf16)", NONE, NONE, NONE, NONE, f"{ref['prose']['reference_ppl']:.3f}",
                 f"{ref['code']['reference_ppl']:.3f}", *[NONE] * 6]
        lines.append("| " + " | ".join(cells) + " |")
    for j in jobs:
        if not j.metrics:
            cells = [j.tool, j.method, str(j.bits), _seconds(j.wall_s), _seconds(j.core_s), j.error[:150], *[""] * 7]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        p, c = j.metrics["prose"], j.metrics["code"]
        mark = "" if j.scored_from == "bitsmith reader" else " †"
        lines.append(
            f"| {j.tool}{mark} | {j.method} | {j.bits} | {_seconds(j.wall_s)} | {_seconds(j.core_s)} | "
            f"{p['ppl']:.3f} | {c['ppl']:.3f} | "
            f"{p['kl']:.4f} | {c['kl']:.4f} | {p['top1']:.4f} | {c['top1']:.4f} | "
            f"{100 * (p['ppl'] / p['reference_ppl'] - 1):+.2f}% | {100 * (c['ppl'] / c['reference_ppl'] - 1):+.2f}% |")
    return lines


def ratios(jobs: list[Job]) -> list[str]:
    lines = ["| bitsmith / llm-compressor | wall | job | ppl prose | ppl code | +ppl prose | +ppl code | KL prose "
             "| KL code |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by_key = {(j.tool, j.method, j.bits): j for j in jobs}
    for (tool, method, bits), ours in by_key.items():
        theirs = by_key.get(("llm-compressor", method, bits))
        if tool != "bitsmith" or theirs is None:
            continue
        row = [f"{method} w{bits}", _ratio(ours.wall_s, theirs.wall_s), _ratio(ours.core_s, theirs.core_s)]
        if ours.metrics and theirs.metrics:
            for key in ("prose", "code"):
                row.append(_ratio(ours.metrics[key]["ppl"], theirs.metrics[key]["ppl"]))
            for key in ("prose", "code"):
                o, t = ours.metrics[key], theirs.metrics[key]
                row.append(_ratio(o["ppl"] - o["reference_ppl"], t["ppl"] - t["reference_ppl"]))
            row += [_ratio(ours.metrics[k]["kl"], theirs.metrics[k]["kl"]) for k in ("prose", "code")]
        else:
            row += [NONE] * 6
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, action="append", help="bit widths, repeatable (default 4)")
    parser.add_argument("--methods", default="gptq,awq", help="comma-separated: gptq, awq")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--tools", default="llm-compressor,bitsmith", help="comma-separated: llm-compressor, bitsmith")
    parser.add_argument("--bitsmith-format", action="append", choices=["compressed-tensors", "gptq"],
                        help="bitsmith's --format, repeatable; the first is evaluated, the others compared to it "
                             "(default: compressed-tensors, gptq)")
    parser.add_argument("--bitsmith-arg", action="append", default=[], help="extra `bitsmith quantize` flag")
    parser.add_argument("--llmc-arg", action="append", default=[], help="extra `llmcompressor_run.py quantize` flag")
    parser.add_argument("--server", help="HOST:PORT of a running bitsmith JobService (default: embedded per job)")
    parser.add_argument("--no-cross-check", dest="cross_check", action="store_false",
                        help="skip compressed-tensors' own dequantization of each checkpoint")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every quantization job this many times, interleaved; the fastest run is reported")
    parser.add_argument("--reuse", type=Path,
                        help="a --keep directory of an earlier run on the same tokens: the llm-compressor jobs "
                             "recorded there are read, not run again (llm-compressor's AWQ takes ~20 min on 2 cores)")
    parser.add_argument("--keep", help="write checkpoints and logs here (default: a temporary directory)")
    parser.add_argument("--json", help="write every number to this JSON file too")
    args = parser.parse_args()
    args.bits = args.bits or [4]
    args.bitsmith_format = args.bitsmith_format or ["compressed-tensors", "gptq"]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]

    import torch
    from bitsmith.calib import calibration_tokens
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL
    from safetensors.torch import save_file

    if "llm-compressor" in tools or args.cross_check:
        ensure_venv()
    with tempfile.TemporaryDirectory(prefix="bitsmith-llmc-") as tmp:
        work = Path(args.keep).resolve() if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            raise SystemExit(f"{work} is not empty")
        tokens = calibration_tokens(DEMO_MODEL, CALIB_FILES, samples=args.samples, seq_len=args.seq_len, seed=0)
        token_file = work / "calibration-input_ids.safetensors"
        save_file({"input_ids": tokens.contiguous()}, token_file)
        token_sha = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
        if args.reuse is not None:
            from safetensors.torch import load_file

            earlier = load_file(args.reuse / token_file.name)["input_ids"]
            if not torch.equal(earlier, tokens):
                raise SystemExit(f"{args.reuse} was calibrated on other tokens; nothing there can be reused")

        jobs = [Job(tool=tool, method=method, bits=bits) for bits in args.bits for method in methods for tool in tools]
        for attempt in range(args.repeats):
            for job in jobs:
                if job.error:
                    continue
                print(f"[{time.strftime('%H:%M:%S')}] {job.tool} {job.method} w{job.bits} (run {attempt + 1}) …",
                      file=sys.stderr, flush=True)
                if job.tool == "llm-compressor":
                    run_llmcompressor(job, args, work, token_file, attempt)
                else:
                    run_bitsmith(job, args, work, attempt)
                done = f"{job.runs[-1]['wall']:.1f} s" if job.runs and not job.error else job.error
                print(f"    {done}", file=sys.stderr, flush=True)
        for job in jobs:
            print(f"[{time.strftime('%H:%M:%S')}] evaluating {job.tool} {job.method} w{job.bits} …", file=sys.stderr,
                  flush=True)
            score(job, args, work)

        llmc = llmc_versions() if venv_python().is_file() else {}
        ours = main_versions()
        print(f"# hardware: {hardware()}; torch threads {torch.get_num_threads()}")
        print(f"# bitsmith {ours.get('bitsmith')} ({ours.get('commit', '?')}), torch {ours['torch']}, "
              f"transformers {ours['transformers']}")
        if llmc:
            print(f"# llm-compressor {llmc['llmcompressor']}, compressed-tensors {llmc['compressed-tensors']}, "
                  f"torch {llmc['torch']} (CUDA {llmc['torch.cuda']}), transformers {llmc['transformers']}")
        print(f"# demo model ref-llama-4m; int{'/'.join(map(str, args.bits))} g{args.group_size} asymmetric, "
              f"Linear except lm_head; {args.samples} x {args.seq_len} calibration tokens (sha256 {token_sha[:16]}); "
              f"eval {args.eval_seq_len}-token windows")
        print()
        print("\n".join(table(jobs)))
        print()
        print("\n".join(ratios(jobs)))
        print()
        for j in jobs:
            extra = []
            if j.tool == "llm-compressor" and j.detail:
                s = j.detail["seconds"]
                extra.append(f"in-process load {s['load']:.1f} s + oneshot {s['oneshot']:.1f} s "
                             f"+ save {s['save']:.1f} s")
            if j.runs:
                extra.append("wall " + ", ".join(f"{r['wall']:.1f}" for r in j.runs) + " s, job "
                             + ", ".join(f"{r['core']:.1f}" for r in j.runs) + " s, 1-min load average at start "
                             + ", ".join(f"{r['load']:.1f}" for r in j.runs))
            if j.scored_from and j.scored_from != "bitsmith reader":
                extra.append(f"† scored from {j.scored_from}")
            print(f"- {j.tool} {j.method} w{j.bits}: " + "; ".join(extra + j.notes))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "hardware": hardware(), "versions": {"bitsmith": ours, "llm-compressor": llmc},
                "tokens_sha256": token_sha, "args": {k: v for k, v in vars(args).items() if k != "json"},
                "jobs": [{"tool": j.tool, "method": j.method, "bits": j.bits, "wall_s": j.wall_s,
                          "job_s": j.core_s, "runs": j.runs, "error": j.error, "scored_from": j.scored_from,
                          "metrics": j.metrics, "detail": j.detail, "notes": j.notes,
                          "checkpoint": str(j.checkpoint) if j.checkpoint else None} for j in jobs],
            }, indent=1, default=str))


if __name__ == "__main__":
    main()

"""bitsmith's GGUF files against llama-quantize's, scored by llama.cpp, on the demo model.

For each llama-quantize type (default Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q3_K_M, Q2_K):
  llama-quantize  — llama.cpp's own `llama-quantize` (built by bench/llama_tools.py) from bitsmith's F16
                    GGUF of the model; with `--imatrix` also from an importance matrix that
                    `llama-imatrix` computes on the same calibration text;
  bitsmith RTN    — `--method rtn --format gguf:TYPE`: llama.cpp's reference block search, no data;
  bitsmith GPTQ   — `--method gptq --format gguf:TYPE`: the block search weighted by the Hessian
                    diagonal (importance) and GPTQ error compensation on the type's grid, on
                    `--samples` x `--seq-len` calibration tokens. All types are solved in one run
                    that shares one calibration (`bitsmith.targets`), as a job with several
                    `--format gguf:…` does.
Every file is scored by llama.cpp's own `llama-perplexity` on eval-prose and eval-code (`--chunks`
windows of 512 tokens, each scored on its second half as llama-perplexity does), with KL divergence and
top-1 agreement against bitsmith's F16 GGUF of the model (`--kl-divergence`). The table gives file sizes
and, per type, the share of llama-quantize's perplexity gap to F16 that bitsmith's calibrated file
closes: 1 - (ppl_gptq - ppl_f16) / (ppl_llq - ppl_f16).

    python bench/gguf_quality.py [--types Q4_K_M,Q3_K_M] [--samples 128] [--seq-len 512] [--chunks 40]
        [--imatrix Q4_K_M,Q3_K_M,Q2_K] [--keep DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from llama_tools import tool_path
from machine import hardware

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
ATTEMPTS = 3
"""On a loaded machine llama-perplexity has exited with status 0 and its last lines, the summary among them,
missing (it logs through a background thread). A run whose summary is missing is run again."""


def write_gguf(out: Path, model_dir: Path, variant: str, quantized: dict[str, Any]) -> Path:
    """An artifact directory holding one GGUF file; the path of that file."""
    from bitsmith.formats import get_format
    from bitsmith.manifest import build_artifact
    from bitsmith.schemes import Format, GPTQOptions

    writer = get_format(Format.GGUF).write
    build_artifact(out, lambda staging: writer(staging, source_model_dir=model_dir, quantized=quantized,
                                               options=GPTQOptions(), variant=variant),
                   format=Format.GGUF, recipe={"variant": variant})
    (path,) = out.glob("*.gguf")
    return path


def solve_all(model_dir: Path, types: list[str], method: str, calib: list[Path], samples: int, seq_len: int
              ) -> tuple[dict[str, dict[str, Any]], float]:
    """Every type's solved linears from one run (one calibration), and its seconds."""
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.recipes import Recipe
    from bitsmith.schemes import Format, Method
    from bitsmith.targets import job_targets

    targets = job_targets(Recipe(method=Method(method)), [(Format.GGUF, t) for t in types], model_dir)
    primary = targets.primary
    assert primary is not None
    start = time.perf_counter()
    result = quantize_in_process(model_dir, calib_files=calib, samples=samples, seq_len=seq_len,
                                 recipe=primary, extra=targets.extra)
    seconds = time.perf_counter() - start
    solved = {targets.primary_key: result.quantized, **result.extra}
    return {t: solved[f"gguf:{t}"] for t in types}, seconds


def llama_quantize(f16: Path, out: Path, qtype: str, imatrix: Path | None) -> Path:
    command = [str(tool_path("llama-quantize"))]
    if imatrix is not None:
        command += ["--imatrix", str(imatrix)]
    subprocess.run([*command, str(f16), str(out), qtype], check=True, capture_output=True)
    return out


def llama_imatrix(f16: Path, calib: list[Path], out: Path, seq_len: int, chunks: int) -> Path:
    text = out.with_suffix(".txt")
    text.write_text("\n".join(p.read_text(encoding="utf-8") for p in calib), encoding="utf-8")
    subprocess.run([str(tool_path("llama-imatrix")), "-m", str(f16), "-f", str(text), "-o", str(out),
                    "-c", str(seq_len), "--chunks", str(chunks)], check=True, capture_output=True)
    return out


def perplexity(model: Path, text: Path, chunks: int, base: Path, *, save_base: bool = False) -> dict[str, float]:
    """llama-perplexity's ppl of `model` on `text`; KL and top-1 against the logits saved in `base`
    (which `save_base` writes, from the reference file)."""
    command = [str(tool_path("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", "512", "-b", "512",
               "--chunks", str(chunks), "--kl-divergence-base", str(base), *([] if save_base else ["--kl-divergence"])]
    log = model.parent / f"{model.name}.{text.stem}.log"
    summary = "Final estimate" if save_base else "Same top p"
    for _ in range(ATTEMPTS):
        with log.open("w") as out:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
        printed = log.read_text(encoding="utf-8", errors="replace")
        if proc.returncode or summary in printed:
            break

    def number(pattern: str) -> float:
        found = re.findall(pattern, printed)
        if not found:
            raise RuntimeError(f"llama-perplexity exited with {proc.returncode} and printed no {pattern!r} for "
                               f"{model} ({len(printed)} characters in {log})")
        return float(found[-1])

    if save_base:
        return {"ppl": number(r"Final estimate: PPL = ([0-9.]+)"), "kl": 0.0, "top1": 1.0}
    return {"ppl": number(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)"), "kl": number(r"Mean\s+KLD:\s*(-?[0-9.]+)"),
            "top1": number(r"Same top p:\s*([0-9.]+)") / 100}


def main() -> None:
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=40, help="512-token windows scored per eval file")
    parser.add_argument("--imatrix", default="", help="types also quantized by llama-quantize with llama-imatrix's "
                                                      "matrix from the calibration text")
    parser.add_argument("--keep", type=Path, help="keep the files here")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    types, with_imatrix = args.types.split(","), [t for t in args.imatrix.split(",") if t]
    print(hardware())
    work = args.keep or Path(tempfile.mkdtemp(prefix="gguf-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    model, evals = Path(DEMO_MODEL), {Path(f).stem: Path(f) for f in EVAL_FILES}

    f16 = write_gguf(work / "bitsmith-F16", model, "F16", {})
    bases = {name: work / f"base-{name}.kld" for name in evals}
    imatrix = llama_imatrix(f16, list(CALIB_FILES), work / "imatrix.dat", args.seq_len, args.samples
                            ) if with_imatrix else None
    rtn, rtn_s = solve_all(model, types, "rtn", list(CALIB_FILES), args.samples, args.seq_len)
    gptq, gptq_s = solve_all(model, types, "gptq", list(CALIB_FILES), args.samples, args.seq_len)
    print(f"bitsmith solves: rtn {rtn_s:.1f}s, gptq {gptq_s:.1f}s for {len(types)} types (one run each)", flush=True)

    def score(path: Path, *, save_base: bool = False) -> dict[str, Any]:
        return {"bytes": path.stat().st_size, **{name: perplexity(path, text, args.chunks, bases[name],
                                                                  save_base=save_base)
                                                 for name, text in evals.items()}}

    def show(qtype: str, tool: str, row: dict[str, Any]) -> None:
        cells = "  ".join(f"{d}: {row[d]['ppl']:.4f} / {row[d]['kl']:.5f} / {row[d]['top1']:.4f}" for d in evals)
        print(f"{qtype:7} {tool:24} {row['bytes']:>10,} B  {cells}", flush=True)

    print(f"\nllama-perplexity, {args.chunks} x 512 tokens per file: ppl / KL / top-1 against bitsmith's F16")
    rows: dict[str, dict[str, Any]] = {"F16": {"bitsmith": score(f16, save_base=True)}}
    show("F16", "bitsmith", rows["F16"]["bitsmith"])
    for qtype in types:
        files = {
            "llama-quantize": llama_quantize(f16, work / f"llq-{qtype}.gguf", qtype, None),
            "bitsmith-rtn": write_gguf(work / f"bitsmith-rtn-{qtype}", model, qtype, rtn[qtype]),
            "bitsmith-gptq": write_gguf(work / f"bitsmith-gptq-{qtype}", model, qtype, gptq[qtype]),
        }
        if imatrix is not None and qtype in with_imatrix:
            files["llama-quantize-imatrix"] = llama_quantize(f16, work / f"llqi-{qtype}.gguf", qtype, imatrix)
        tools: dict[str, Any] = {}
        for name, path in files.items():
            tools[name] = score(path)
            show(qtype, name, tools[name])
        base = rows["F16"]["bitsmith"]
        tools["gap_closed"] = {d: 1 - (tools["bitsmith-gptq"][d]["ppl"] - base[d]["ppl"])
                               / (tools["llama-quantize"][d]["ppl"] - base[d]["ppl"]) for d in evals}
        tools["same_bytes_as_llama_quantize"] = tools["bitsmith-gptq"]["bytes"] == tools["llama-quantize"]["bytes"]
        print(f"{qtype:7} gap closed by bitsmith-gptq: "
              + "  ".join(f"{d} {c:.2f}" for d, c in tools["gap_closed"].items())
              + f"   file sizes equal: {tools['same_bytes_as_llama_quantize']}", flush=True)
        rows[qtype] = tools
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware(), "chunks": args.chunks, "rows": rows}, indent=1),
                             encoding="utf-8")


if __name__ == "__main__":
    main()

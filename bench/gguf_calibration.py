"""Calibrated GGUF mixes over calibration seeds: how much of llama-quantize's perplexity gap each closes.

For each mix (default Q4_K_M, Q3_K_M, Q2_K) the demo model is quantized twice per calibration seed, each
mix alone as its job's primary target, in process (`quantize_in_process`): round to nearest
(`--method rtn`, llama.cpp's reference block search, byte-identical to llama-quantize's file) and GPTQ
with the Hessian diagonal as importance (act-order, the defaults), plain and with
`--asymmetric-calibration`. Every file is written as GGUF and scored by llama.cpp (llama-cpp-python,
through `bitsmith.runtimes.evaluate_path`) on every 512-token window of eval-prose and eval-code, with KL
divergence against the unquantized model. *Gap closed* = 1 - (ppl - ref) / (ppl RTN - ref), ref the
unquantized model's perplexity on the same windows.

    python bench/gguf_calibration.py [--mixes Q4_K_M,Q3_K_M] [--seeds 0,1,2] [--samples 128]
        [--seq-len 512] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from gguf_quality import write_gguf
from machine import hardware

MIXES = ("Q4_K_M", "Q3_K_M", "Q2_K")
VARIANTS = {"rtn": ("rtn", False), "gptq": ("gptq", False), "gptq-asymmetric": ("gptq", True)}
"""Variant name -> (method, asymmetric calibration)."""


def score(work: Path, mix: str, variant: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Solve `mix` alone with `variant` at calibration `seed`, write it, and score it with llama.cpp."""
    from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
    from bitsmith.pipeline import quantize_in_process
    from bitsmith.recipes import Recipe
    from bitsmith.runtimes import evaluate_path
    from bitsmith.schemes import Format, GPTQOptions, Method
    from bitsmith.targets import job_targets

    method, asymmetric = VARIANTS[variant]
    recipe = Recipe(method=Method(method), gptq=GPTQOptions(asymmetric_calibration=asymmetric))
    targets = job_targets(recipe, [(Format.GGUF, mix)], Path(DEMO_MODEL))
    assert targets.primary is not None
    start = time.perf_counter()
    solved = quantize_in_process(DEMO_MODEL, calib_files=list(CALIB_FILES), samples=args.samples,
                                 seq_len=args.seq_len, recipe=targets.primary, seed=seed).quantized
    seconds = time.perf_counter() - start
    path = write_gguf(work / f"{variant}-{mix}-{seed}", Path(DEMO_MODEL), mix, solved)
    results = evaluate_path(path, list(EVAL_FILES), reference=Path(DEMO_MODEL))
    return {"solve_s": seconds, "bytes": path.stat().st_size,
            **{Path(r.dataset).stem: {"ppl": r.ppl, "kl": r.kl, "reference_ppl": r.reference_ppl} for r in results}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    print(hardware(), flush=True)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gguf-calibration-") as tmp:
        for mix in args.mixes.split(","):
            rtn = score(Path(tmp), mix, "rtn", 0, args)  # rounding sees no calibration data: one file
            rows[mix] = {"rtn": rtn}
            for seed in (int(s) for s in args.seeds.split(",")):
                for variant in ("gptq", "gptq-asymmetric"):
                    row = score(Path(tmp), mix, variant, seed, args)
                    sets = [k for k in row if isinstance(row[k], dict)]
                    closed = {d: 1 - (row[d]["ppl"] - row[d]["reference_ppl"])
                              / (rtn[d]["ppl"] - rtn[d]["reference_ppl"]) for d in sets}
                    row["gap_closed"] = closed
                    rows[mix][f"{variant}-seed{seed}"] = row
                    print(f"{mix:7} {variant:16} seed {seed}  " + "  ".join(
                        f"{d}: ppl {row[d]['ppl']:.4f} KL {row[d]['kl']:.5f} closed {closed[d]:.3f}" for d in sets)
                        + f"  ({row['solve_s']:.0f} s solve)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"hardware": hardware(), "rows": rows}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()

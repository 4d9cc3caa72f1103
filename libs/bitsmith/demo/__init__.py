"""The embedded default: a small, really trained Llama and its calibration / evaluation text.

Shipped inside the package so `bitsmith quantize` works on a fresh clone with no other files;
see `models/ref-llama-4m/README.md` and `data/README.md` for provenance and licenses.
"""

from __future__ import annotations

from pathlib import Path

DEMO_ROOT = Path(__file__).resolve().parent
DEMO_MODEL = DEMO_ROOT / "models" / "ref-llama-4m"
DEMO_DATA = DEMO_ROOT / "data"
CALIB_FILES = (DEMO_DATA / "calib-prose.txt", DEMO_DATA / "calib-code.txt")
EVAL_FILES = (DEMO_DATA / "eval-prose.txt", DEMO_DATA / "eval-code.txt")

"""What machine a benchmark ran on, printed beside its numbers (machines here are noisy and shared)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def gpu() -> str | None:
    """The first CUDA device as name, SMs and memory, or None without one (or without torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    memory = props.total_memory / 2**30
    return f"{props.name}, {props.multi_processor_count} SMs, {memory:.0f} GiB; torch {torch.__version__}"


@contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    """`path` (created) to keep a benchmark's files, or a temporary directory removed afterwards."""
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def hardware() -> str:
    """The GPU (if any), CPU model, logical CPU count, OS/arch and Python version, in one line."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.machine()}"
    cpu = f"{model}; {os.cpu_count()} logical CPUs; {system}; Python {platform.python_version()}"
    device = gpu()
    return cpu if device is None else f"{device}; {cpu}"


def run_bench(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace, Path], dict[str, Any]],
              report: Callable[[dict[str, Any]], None]) -> None:
    """A benchmark's main: parse `parser`'s arguments plus `--work` (keep the files there) and `--json`
    (write the results there), run in the work directory, print the report."""
    parser.add_argument("--work", type=Path, help="keep the checkpoints and artifacts here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with work_dir(args.work) as work:
        results = run(args, work)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))

"""What machine a benchmark ran on, printed beside its numbers (machines here are noisy and shared)."""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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

"""What machine a benchmark ran on, printed beside its numbers (machines here are noisy and shared)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def hardware() -> str:
    """CPU model, logical CPU count, OS/arch and Python version, in one line."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.machine()}"
    return f"{model}; {os.cpu_count()} logical CPUs; {system}; Python {platform.python_version()}"

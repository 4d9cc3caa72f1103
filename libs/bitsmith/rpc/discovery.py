"""Finding the stack `bitsmith up` left running: its home directory and its stack file.

The SDK and the CLI both connect to "the local stack" when given no address, so where it lives is
decided here, once. The stack file is written atomically by the process that serves the stack and
names its pid, so a file left behind by a dead stack is recognised and ignored. Beside the gRPC
address it may name the coordinator's HTTP port (health, metrics, job reports).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STACK_FILE = "stack.json"


def default_home() -> Path:
    """Where a long-running stack keeps its job store, artifact store and address."""
    return Path(os.environ.get("BITSMITH_HOME", Path.home() / ".bitsmith"))


def write_stack_file(home: Path, address: str, http_address: str | None = None) -> None:
    """Record the serving process's addresses and pid in `home` (atomically: readers never see half)."""
    info: dict[str, Any] = {"address": address, "pid": os.getpid()}
    if http_address:
        info["http_address"] = http_address
    tmp = home / f".{STACK_FILE}.tmp"
    tmp.write_text(json.dumps(info))
    tmp.replace(home / STACK_FILE)


def _live_stack(home: Path) -> dict[str, Any] | None:
    """The stack file in `home`, if the process it names is alive."""
    try:
        info = json.loads((home / STACK_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info


def running_stack(home: Path) -> str | None:
    """The address of the stack `bitsmith up` left running in `home`, if its process is alive."""
    info = _live_stack(home)
    return str(info["address"]) if info and "address" in info else None


def running_stack_http(home: Path) -> str | None:
    """The HTTP address (health, metrics, job reports) of the stack running in `home`, if it has one."""
    info = _live_stack(home)
    return str(info["http_address"]) if info and info.get("http_address") else None

"""Finding the stack `bitsmith up` left running: its home directory and its stack file.

The SDK and the CLI both connect to "the local stack" when given no address, so where it lives is
decided here, once. The stack file is written atomically by the process that serves the stack and
names its pid, so a file left behind by a dead stack is recognised and ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

STACK_FILE = "stack.json"


def default_home() -> Path:
    """Where a long-running stack keeps its job store, artifact store and address."""
    return Path(os.environ.get("BITSMITH_HOME", Path.home() / ".bitsmith"))


def write_stack_file(home: Path, address: str) -> None:
    """Record the serving process's address and pid in `home` (atomically: readers never see half)."""
    tmp = home / f".{STACK_FILE}.tmp"
    tmp.write_text(json.dumps({"address": address, "pid": os.getpid()}))
    tmp.replace(home / STACK_FILE)


def running_stack(home: Path) -> str | None:
    """The address of the stack `bitsmith up` left running in `home`, if its process is alive."""
    try:
        info = json.loads((home / STACK_FILE).read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return str(info["address"])

"""Worker services as processes of their own at fixed addresses, for tests that kill or starve them."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from bitsmith_services.coordinator.placement import ServiceAddresses
from bitsmith_services.registry import Role


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers:
    """The worker services as processes of their own, each at a fixed address, killable and restartable."""

    def __init__(self, store: Path, *, max_file_bytes: Mapping[Role, int] | None = None) -> None:
        """`max_file_bytes`: the largest file a role's process may write (RLIMIT_FSIZE): a full disk."""
        self.store = store
        self.max_file_bytes = dict(max_file_bytes or {})
        self.ports = {role: _free_port() for role in Role}
        self.processes: dict[Role, subprocess.Popen[str]] = {}
        for role in Role:
            self.start(role)

    def start(self, role: Role) -> None:
        process = subprocess.Popen(
            [sys.executable, "-m", "bitsmith_services.cli", "serve", role.value, "--port", str(self.ports[role]),
             "--store", str(self.store)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            preexec_fn=_file_limit(self.max_file_bytes.get(role)),
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip().endswith(f":{self.ports[role]}"), f"{role} did not start"
        self.processes[role] = process

    def kill(self, role: Role) -> None:
        process = self.processes[role]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def addresses(self) -> ServiceAddresses:
        return ServiceAddresses({role: f"127.0.0.1:{port}" for role, port in self.ports.items()})

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(timeout=30)




def _file_limit(limit: int | None) -> Callable[[], None] | None:
    """A preexec function capping the size of files the process writes (Python ignores SIGXFSZ, so a
    write past it fails with EFBIG, as one on a full disk fails with ENOSPC)."""
    if limit is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

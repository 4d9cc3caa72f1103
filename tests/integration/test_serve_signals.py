"""`bitsmith serve` stops on SIGTERM whichever of its threads the kernel hands the signal to.

Python runs signal handlers in the main thread only. A signal the kernel delivers to another thread (a
service has many: gRPC's, hashing workers, CUDA's) only flags the handler as pending, and a main thread
blocked on a lock without a timeout never looks: a calibrator once ignored SIGTERM that way. `kill` with a
thread's id hands the process-wide signal to that thread first, which makes the case deterministic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc/<pid>/task")
@pytest.mark.parametrize("role", ["solver", "coordinator"])
def test_serve_stops_on_a_sigterm_another_thread_receives(tmp_path: Path, role: str) -> None:
    args = ["--home", str(tmp_path / "home")] if role == "coordinator" else ["--store", str(tmp_path / "store")]
    service = subprocess.Popen([sys.executable, "-m", "bitsmith_services.cli", "serve", role, "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert service.stdout is not None
        assert service.stdout.readline().strip(), f"{role} did not start"
        others = sorted(int(t) for t in os.listdir(f"/proc/{service.pid}/task") if int(t) != service.pid)
        assert others, f"{role} runs no thread besides its main one"
        os.kill(others[0], signal.SIGTERM)
        assert service.wait(timeout=30) == 0
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()

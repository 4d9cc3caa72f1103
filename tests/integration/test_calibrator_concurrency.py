"""A freshly started calibrator answers many Plans at once: the first ones load the checkpoint (and
import transformers, whose lazy names race between threads) one at a time, and none fails."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from bitsmith.demo import DEMO_MODEL
from bitsmith.v1 import calibrator_pb2, calibrator_pb2_grpc


def test_concurrent_first_plans_all_succeed(tmp_path: Path) -> None:
    # Its own process: in this one transformers is imported already and the race cannot happen.
    service = subprocess.Popen(
        [sys.executable, "-m", "bitsmith_services.cli", "serve", "calibrator", "--port", "0", "--store",
         str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert service.stdout is not None
        address = service.stdout.readline().strip()
        with grpc.insecure_channel(address) as channel:
            stub = calibrator_pb2_grpc.CalibratorServiceStub(channel)

            def plan(_: int) -> int:
                return len(stub.Plan(calibrator_pb2.PlanRequest(model_path=str(DEMO_MODEL)), timeout=120).blocks)

            with ThreadPoolExecutor(12) as pool:
                assert list(pool.map(plan, range(12))) == [4] * 12
    finally:
        service.terminate()
        service.wait(timeout=30)

"""A real stack in the test process: the four worker services and the coordinator on loopback gRPC,
placed statically (the Ray-placed stack has its own tests)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.rpc.client import Client
from bitsmith.v1 import common_pb2, job_pb2
from bitsmith_services.coordinator.placement import ServiceAddresses, StaticPlacement
from bitsmith_services.coordinator.server import create_server
from bitsmith_services.registry import Role, start_service


@dataclass
class Stack:
    client: Client
    addresses: ServiceAddresses
    address: str
    home: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    servers = {role: start_service(role, "127.0.0.1:0", home / "store") for role in Role}
    addresses = ServiceAddresses({role: f"127.0.0.1:{port}" for role, (_, port) in servers.items()})
    server, port, coordinator = create_server("127.0.0.1:0", db_path=home / "jobs.sqlite",
                                              placement=StaticPlacement(addresses))
    client = Client(f"127.0.0.1:{port}")
    yield Stack(client=client, addresses=addresses, address=f"127.0.0.1:{port}", home=home)
    client.close()
    server.stop(grace=1).wait()
    coordinator.shutdown()
    for s, _ in servers.values():
        s.stop(grace=1).wait()


def make_job(out: Path, *, method: int = common_pb2.METHOD_GPTQ, bits: int = 4, group_size: int = 128,
             samples: int = 8, seq_len: int = 128, model: Path = DEMO_MODEL, evaluate: bool = False,
             request_id: str = "", min_zero: int = 1, gate: common_pb2.QualityGate | None = None,
             ) -> job_pb2.QuantizeJob:
    """A small job on the demo model (few calibration samples so the suite stays fast)."""
    return job_pb2.QuantizeJob(
        model_path=str(model),
        recipe=common_pb2.Recipe(
            method=method,  # type: ignore[arg-type]
            scheme=common_pb2.QuantScheme(bits=bits, group_size=group_size, sym=False, min_zero=min_zero),
            gptq=common_pb2.GPTQOptions(damp_percent=0.01, true_sequential=True),
        ),
        calibration=common_pb2.CalibrationSpec(files=[str(f) for f in CALIB_FILES], samples=samples,
                                               seq_len=seq_len, seed=0),
        output=common_pb2.OutputSpec(path=str(out), formats=[common_pb2.OutputFormat(format=common_pb2.FORMAT_GPTQ)]),
        eval=common_pb2.EvalSpec(files=[str(EVAL_FILES[0])] if evaluate else [], seq_len=256,
                                 gate=gate or common_pb2.QualityGate()),
        client_request_id=request_id,
    )


def wait(client: Client, job_id: str) -> job_pb2.Job:
    """Follow the job through Watch to its end and return its final record."""
    for _ in client.watch(job_id):
        pass
    return client.get(job_id)

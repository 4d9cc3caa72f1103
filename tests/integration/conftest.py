"""A real stack in the test process: the four worker services and the coordinator on loopback gRPC,
placed statically (the Ray-placed stack has its own tests)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from bitsmith.demo import CALIB_FILES, DEMO_MODEL, EVAL_FILES
from bitsmith.recipes import ModuleOverride, Recipe
from bitsmith.rpc import Calibration, Client, Evaluation, OutputFormat, QualityGate, QuantizeRequest
from bitsmith.schemes import GPTQOptions, Method, QuantScheme
from bitsmith_services.coordinator.placement import ServiceAddresses, StaticPlacement
from bitsmith_services.coordinator.server import create_server
from bitsmith_services.registry import Role, ServiceOptions, start_service


@dataclass
class Stack:
    client: Client
    addresses: ServiceAddresses
    address: str
    home: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from running_stack(tmp_path_factory.mktemp("stack"))


def running_stack(home: Path, calibrator: ServiceOptions | None = None) -> Iterator[Stack]:
    """Every service on loopback with its store under `home`, the calibrator run as `calibrator` says;
    stopped when the generator is closed."""
    servers = {role: start_service(role, "127.0.0.1:0", home / "store",
                                   options=calibrator if role is Role.CALIBRATOR else None) for role in Role}
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


def make_request(out: Path, *, method: Method = Method.GPTQ, bits: int = 4, group_size: int = 128,
                 samples: int = 8, seq_len: int = 128, model: Path = DEMO_MODEL, calibrate: bool = True,
                 mode: str = "sequential", evaluate: bool = False, gate: QualityGate | None = None,
                 request_id: str | None = None, formats: tuple[str, ...] = ("gptq",),
                 checkpoint_format: str = "gptq", overrides: tuple[ModuleOverride, ...] = ()) -> QuantizeRequest:
    """A small job on the demo model (few calibration samples so the suite stays fast): GPTQ without
    activation ordering, into a v1 GPTQ checkpoint unless told otherwise."""
    recipe = Recipe(method=method, scheme=QuantScheme(bits=bits, group_size=group_size),
                    gptq=GPTQOptions(damp_percent=0.01, act_order=False, static_groups=False, true_sequential=True),
                    overrides=overrides)
    return QuantizeRequest(
        model=model, out=out, recipe=recipe,
        calibration=Calibration(files=CALIB_FILES, samples=samples, seq_len=seq_len, mode=mode) if calibrate else None,
        formats=tuple(OutputFormat.parse(f) for f in formats),
        evaluation=Evaluation(files=[EVAL_FILES[0]], seq_len=256, gate=gate) if evaluate else None,
        request_id=request_id, checkpoint_format=checkpoint_format,
    )

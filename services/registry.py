"""The services bitsmith runs, by role, imported lazily so a process loads only the one it serves."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from bitsmith.devices import AUTO, MatmulPrecision
from bitsmith.errors import ConfigError
from bitsmith.rpc.security import SecurityConfig, securing
from bitsmith.runtimes import Target


class Role(StrEnum):
    """A worker service the coordinator talks to (the coordinator itself is not one of them)."""

    CALIBRATOR = "calibrator"
    SOLVER = "solver"
    PACKER = "packer"
    RUNTIME_CPU = "runtime_cpu"
    RUNTIME_APPLE = "runtime_apple"
    RUNTIME_NVIDIA = "runtime_nvidia"


RUNTIME_ROLES = {Target.CPU: Role.RUNTIME_CPU, Target.APPLE: Role.RUNTIME_APPLE, Target.NVIDIA: Role.RUNTIME_NVIDIA}
"""The service that proves artifacts on each target."""

COMPUTE_ROLES = frozenset({Role.CALIBRATOR, Role.SOLVER})
"""The roles that compute on a device of their choosing (the others read and write files)."""


class Activations(StrEnum):
    """Where the calibrator keeps a job's activations between blocks (`bitsmith_services.calibrator.activations`)."""

    STORE = "store"
    HOST = "host"
    DEVICE = "device"


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceOptions:
    """How one worker service computes: the one home of the per-service settings beside its store.

    `device` ("auto", "cpu", "cuda", "cuda:N") applies to `COMPUTE_ROLES`; "auto" takes CUDA where
    torch sees a GPU. `activations` applies to the calibrator: `host` keeps them in its memory, which a
    GPU calibrator wants (writing a calibration set to the store per block costs more than the block's
    compute), `device` on its GPU (faster still: no copies per block; the job needs free device memory for
    four calibration sets at its start), `store` lets any replica continue a job. `matmul_precision`
    applies to the calibrator on a GPU: `high` (TensorFloat-32) runs the block forwards and Hessian
    products several times faster than `highest` (exact float32), `bfloat16` runs them in bfloat16; the
    solver always solves in exact float32.
    """

    device: str = AUTO
    activations: Activations = Activations.STORE
    matmul_precision: MatmulPrecision = MatmulPrecision.HIGH

    def check(self, role: Role) -> None:
        """Refuse settings the role does not take, rather than ignoring them."""
        if self.device != AUTO and role not in COMPUTE_ROLES:
            raise ConfigError(f"{role.value} takes no device; only {sorted(r.value for r in COMPUTE_ROLES)} compute")
        if self.activations is not Activations.STORE and role is not Role.CALIBRATOR:
            raise ConfigError(f"{role.value} keeps no activations; only the calibrator does")
        if self.matmul_precision is not MatmulPrecision.HIGH and role is not Role.CALIBRATOR:
            raise ConfigError(f"{role.value} takes no matmul precision; only the calibrator does")

    def for_role(self, role: Role) -> ServiceOptions:
        """These options as `role` takes them: the settings it has no use for back at their defaults, so one
        set of options can start every worker of a stack."""
        return ServiceOptions(
            device=self.device if role in COMPUTE_ROLES else AUTO,
            activations=self.activations if role is Role.CALIBRATOR else Activations.STORE,
            matmul_precision=self.matmul_precision if role is Role.CALIBRATOR else MatmulPrecision.HIGH,
        )

    def server_kwargs(self, role: Role) -> dict[str, Any]:
        """The keyword arguments of `role`'s `create_server` beside its store root."""
        kwargs: dict[str, Any] = {}
        if role in COMPUTE_ROLES:
            kwargs["device"] = self.device
        if role is Role.CALIBRATOR:
            kwargs["activations"] = self.activations
            kwargs["matmul_precision"] = self.matmul_precision
        return kwargs


ServerFactory = Callable[..., tuple[grpc.Server, int]]


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError as exc:
        raise ConfigError(f"unknown service {role!r}; known: {[r.value for r in Role]}") from exc


def server_factory(role: Role | str) -> ServerFactory:
    """`create_server(address, *, store_root, ...)` of a role's module (see `ServiceOptions.server_kwargs`)."""
    module: Any = importlib.import_module(f"bitsmith_services.{_role(role).value}.server")
    factory: ServerFactory = module.create_server
    return factory


def start_service(role: Role | str, address: str, store_root: Path, *, options: ServiceOptions | None = None,
                  security: SecurityConfig | None = None) -> tuple[grpc.Server, int]:
    """Start one worker service on `address`, serving the artifact store at `store_root`, run as `options` say
    (default: every setting's default), secured by `security` (None: plaintext, open)."""
    role = _role(role)
    options = options or ServiceOptions()
    options.check(role)
    with securing(security):
        return server_factory(role)(address, store_root=store_root, **options.server_kwargs(role))

"""The services bitsmith runs, by role, imported lazily so a process loads only the one it serves."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import grpc
from bitsmith.errors import ConfigError


class Role(StrEnum):
    """A worker service the coordinator talks to (the coordinator itself is not one of them)."""

    CALIBRATOR = "calibrator"
    SOLVER = "solver"
    PACKER = "packer"
    RUNTIME_CPU = "runtime_cpu"
    RUNTIME_APPLE = "runtime_apple"


ServerFactory = Callable[..., tuple[grpc.Server, int]]


def server_factory(role: Role | str) -> ServerFactory:
    """`create_server(address, *, store_root)` of a role's module."""
    try:
        role = Role(role)
    except ValueError as exc:
        raise ConfigError(f"unknown service {role!r}; known: {[r.value for r in Role]}") from exc
    module: Any = importlib.import_module(f"bitsmith_services.{role.value}.server")
    factory: ServerFactory = module.create_server
    return factory


def start_service(role: Role | str, address: str, store_root: Path) -> tuple[grpc.Server, int]:
    """Start one worker service on `address`, serving the artifact store at `store_root`."""
    return server_factory(role)(address, store_root=store_root)

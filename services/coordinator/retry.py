"""Calls to a worker that went away are retried until it is back.

A worker service dies (an OOM kill, a node drained, a crash) and comes back: Ray restarts its actor,
or an operator its process, at the same address. Every worker call a job makes is a deterministic
function of references into the store (a step's outputs overwrite the same keys), so repeating a call
after `UNAVAILABLE` gives what the first would have given, and the job goes on from the step that
failed instead of failing: its artifact is the one an undisturbed run writes. Other errors are
answers, never retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc

log = logging.getLogger("bitsmith.coordinator")
S = TypeVar("S")

RETRY_WINDOW_ENV = "BITSMITH_WORKER_RETRY_S"
DEFAULT_RETRY_WINDOW_S = 180.0
"""How long a worker may stay unreachable before the job fails (a Ray actor restart takes seconds,
a process restarted by hand or by a supervisor longer)."""
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 5.0


def retry_window_s() -> float:
    return float(os.environ.get(RETRY_WINDOW_ENV, DEFAULT_RETRY_WINDOW_S))


class Retrying:
    """A gRPC stub whose unary calls are repeated, with backoff, while they fail `UNAVAILABLE`."""

    def __init__(self, stub: Any, role: str, *, window_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._stub = stub
        self._role = role
        self._window_s = retry_window_s() if window_s is None else window_s
        self._sleep = sleep

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        method = getattr(self._stub, rpc)

        def call(request: Any, **kwargs: Any) -> Any:
            give_up = time.monotonic() + self._window_s
            delay = FIRST_DELAY_S
            while True:
                try:
                    return method(request, **kwargs)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > give_up:
                        raise
                    log.warning("worker unavailable; retrying", extra={
                        "role": self._role, "rpc": rpc, "retry_in_s": delay, "reason": exc.details()})
                    self._sleep(delay)
                    delay = min(2 * delay, MAX_DELAY_S)

        return call


def retrying(stub: S, role: str) -> S:
    """`stub` with its calls retried while its worker is unavailable (typed as the stub itself)."""
    return cast(S, Retrying(stub, role))

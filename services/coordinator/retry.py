"""Calls to a worker that went away are retried until it is back, wherever it came back.

A worker service dies (an OOM kill, a node drained, a crash) and comes back: Ray restarts its actor
(on a new port), or an operator or supervisor its process (at the same address). Every worker call a
job makes is a deterministic function of references into the store (a step's outputs overwrite the
same keys), so repeating a call after `UNAVAILABLE` gives what the first would have given, and the job
goes on from the step that failed instead of failing: its artifact is the one an undisturbed run
writes. Between tries the link asks the placement where the worker is now and reconnects if it moved.
Other errors are answers, never retried.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import grpc
from bitsmith.rpc.client import open_channel
from bitsmith.rpc.security import scoped, securing

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


class WorkerLink:
    """One worker role's channel and stub, reopened where `locate` says the worker is now.

    The security in force when the link is made (`bitsmith.rpc.security.securing`) is kept for every
    reopened channel: a reconnect happens later, outside the scope the coordinator started in.
    """

    def __init__(self, role: str, address: str, make_stub: Callable[[grpc.Channel], Any],
                 locate: Callable[[], str] | None = None) -> None:
        self.role = role
        self._make_stub = make_stub
        self._locate = locate
        self._security = scoped()
        self.address = address
        self.channel = open_channel(address, component="coordinator")
        self.stub = make_stub(self.channel)

    def relocate(self) -> None:
        """Reconnect if the worker now answers elsewhere (no-op when it cannot move)."""
        if self._locate is None:
            return
        address = self._locate()
        if address == self.address:
            return
        with securing(self._security):
            channel = open_channel(address, component="coordinator")
        old, self.channel, self.address, self.stub = self.channel, channel, address, self._make_stub(channel)
        old.close()
        log.info("worker moved", extra={"role": self.role, "address": address})

    def close(self) -> None:
        self.channel.close()


class Retrying:
    """Unary calls on a link's stub, repeated with backoff while they fail `UNAVAILABLE`."""

    def __init__(self, link: WorkerLink, *, window_s: float | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._link = link
        self._window_s = retry_window_s() if window_s is None else window_s
        self._sleep = sleep

    def __getattr__(self, rpc: str) -> Callable[..., Any]:
        def call(request: Any, **kwargs: Any) -> Any:
            give_up = time.monotonic() + self._window_s
            delay = FIRST_DELAY_S
            while True:
                try:
                    return getattr(self._link.stub, rpc)(request, **kwargs)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() + delay > give_up:
                        raise
                    log.warning("worker unavailable; retrying", extra={
                        "role": self._link.role, "rpc": rpc, "retry_in_s": delay, "reason": exc.details()})
                self._sleep(delay)
                delay = min(2 * delay, MAX_DELAY_S)
                try:
                    self._link.relocate()
                except Exception:  # the worker is not back yet; the next try or relocation will tell
                    log.warning("worker not found yet", extra={"role": self._link.role}, exc_info=True)

        return call


def retrying(link: WorkerLink, stub_type: type[S]) -> S:
    """The link's stub (of `stub_type`) with its calls retried while its worker is unavailable."""
    return cast(S, Retrying(link))

"""The coordinator's retry of worker calls: UNAVAILABLE is waited out (with growing pauses, asking where
the worker is now between tries) until the window closes; every other status is an answer and goes
straight back."""

from __future__ import annotations

import grpc
import pytest
from bitsmith_services.coordinator.retry import FIRST_DELAY_S, MAX_DELAY_S, Retrying


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._code.name


class Flaky:
    """A stub whose Solve fails with the given codes, then answers."""

    def __init__(self, *codes: grpc.StatusCode) -> None:
        self.codes = list(codes)
        self.calls: list[tuple[str, float | None]] = []

    def Solve(self, request: str, timeout: float | None = None) -> str:
        self.calls.append((request, timeout))
        if self.codes:
            raise Failure(self.codes.pop(0))
        return f"solved {request}"


class Link:
    """A worker link whose worker moves to a new stub after `moves_after` relocations."""

    role = "solver"

    def __init__(self, stub: Flaky, moved: Flaky | None = None, moves_after: int = 0) -> None:
        self.stub, self._moved, self._moves_after, self.relocations = stub, moved, moves_after, 0

    def relocate(self) -> None:
        self.relocations += 1
        if self._moved is not None and self.relocations == self._moves_after:
            self.stub = self._moved


def test_unavailable_is_retried_with_growing_pauses() -> None:
    pauses: list[float] = []
    stub = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 7)
    link = Link(stub)
    assert Retrying(link, window_s=60, sleep=pauses.append).Solve("q", timeout=5.0) == "solved q"  # type: ignore[arg-type]
    assert stub.calls == [("q", 5.0)] * 8 and link.relocations == 7
    assert pauses[0] == FIRST_DELAY_S and pauses == sorted(pauses) and max(pauses) == MAX_DELAY_S


def test_a_worker_that_moved_is_called_where_it_is_now() -> None:
    gone, moved = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 100), Flaky()
    link = Link(gone, moved, moves_after=3)
    assert Retrying(link, window_s=60, sleep=lambda _: None).Solve("q") == "solved q"  # type: ignore[arg-type]
    assert len(gone.calls) == 3 and moved.calls == [("q", None)]


def test_other_errors_are_answers_and_the_window_is_kept() -> None:
    stub = Flaky(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(Failure) as refused:
        Retrying(Link(stub), window_s=60, sleep=lambda _: None).Solve("q")  # type: ignore[arg-type]
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT and len(stub.calls) == 1
    gone = Flaky(*[grpc.StatusCode.UNAVAILABLE] * 100)
    with pytest.raises(Failure):
        Retrying(Link(gone), window_s=0.0, sleep=lambda _: None).Solve("q")  # type: ignore[arg-type]
    assert len(gone.calls) == 1

"""A GGUF artifact run by llama.cpp (llama-cpp-python) in a worker process, behind a causal-LM interface.

Why a worker process: llama.cpp answers many inconsistent files with ``GGML_ASSERT`` → ``abort()``, which
kills the process that loaded it. The file is first checked byte by byte (`bitsmith.formats.gguf.validate`),
then loaded only in a child (`bitsmith.formats.gguf.worker`, which imports no torch) that talks to this
process over a socket pair (`Channel`); a child that dies becomes a `FormatError` naming the file, the signal and
llama.cpp's last words, and the service that asked keeps serving. A child that sends nothing for
`worker_timeout` seconds while a request waits on it is hung (a deadlocked llama.cpp, a stopped process):
it is killed and the request fails with `ServiceUnavailableError`. A live worker stays up for its file
(keyed by path, mtime and size) so repeated calls do not reload it.

What runs where:
- Scoring: `GgufCausalLM.forward` answers the transformers calling convention ``model(ids).logits`` with
  the logits of every position of each window, so `bitsmith.evaluate` scores llama.cpp over exactly the
  windows it scores the reference on. Each window is a fresh sequence (the KV cache is cleared).
- Tokens: llama.cpp's own tokenizer of the file (the vocabulary the file carries), with special-token
  text parsed and nothing added, as bitsmith tokenizes with transformers (``add_special_tokens=False``).
- Generation: greedy, in the worker's own loop (llama.cpp's KV cache, one ``eval`` per token), each
  token's bytes sent as soon as it is decoded; a stop request is checked between tokens. The worker times
  its prompt pass and its decode steps (`GenerationStats`). This side hands its consumer, whenever it asks,
  all the text that has arrived: one token's while the consumer keeps up, several tokens' joined when it is
  slower than decoding (a gRPC send costs more than a small model's decode step), so the consumer's
  per-message cost is paid per chunk rather than per token and no text ever waits for more.
"""

from __future__ import annotations

import codecs
import collections
import importlib.util
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bitsmith.errors import (
    BitsmithError,
    ConfigError,
    FormatError,
    NotFoundError,
    ServiceUnavailableError,
    UnsupportedError,
)
from bitsmith.formats.gguf.worker import Channel
from bitsmith.runtimes import GenerationStats, Throughput

log = logging.getLogger("bitsmith.runtime.gguf")

CRASH_SIGNALS = frozenset({signal.SIGABRT, signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL})
"""Deaths that are llama.cpp refusing the file (an assert or a bad access): `FormatError`. Any other death
(killed from outside, out of memory, a bug in the worker) is `ServiceUnavailableError`: retrying may work."""
STDERR_LINES = 60
POOL_SIZE = 2
EXIT_WAIT_S = 10.0
WORKER_MODULE = "bitsmith.formats.gguf.worker"
WORKER_TIMEOUT_ENV = "BITSMITH_LLAMA_WORKER_TIMEOUT_S"
WORKER_TIMEOUT_S = 600.0
"""How long a request waits for its worker's next message before the worker counts as hung. It must exceed
the longest single llama.cpp step of a request (loading the file, one prompt pass, one scoring window), so
the default is generous; `WORKER_TIMEOUT_ENV` sets it for a service."""


THREADS_ENV = "BITSMITH_LLAMA_THREADS"
"""llama.cpp's threads per worker. By default every core this process may run on: llama.cpp's CPU kernels
scale with them, but its threads spin between operations, so on a host whose cores they fill the service's
own per-token work (reading the worker's bytes, the gRPC send) waits for a core; leaving one core free
removes that wait (docs/benchmarks.md, CPU runtimes)."""


def cpu_threads() -> int:
    """`THREADS_ENV` if set, else every core this process may run on."""
    raw = os.environ.get(THREADS_ENV)
    if raw is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{THREADS_ENV} must be a positive whole number of threads, got {raw!r}")
    return int(raw)


def worker_timeout() -> float:
    """Seconds of silence after which a worker is hung: `WORKER_TIMEOUT_ENV`, else `WORKER_TIMEOUT_S`."""
    raw = os.environ.get(WORKER_TIMEOUT_ENV)
    if raw is None:
        return WORKER_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ConfigError(f"{WORKER_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return seconds


# ----------------------------------------------------------------------------------------------------------
# The service side: a handle on one worker process.


class LlamaWorker:
    """One worker process serving one GGUF file; requests are serialized by a lock.

    `timeout_s`: how long a request waits for the worker's next message before it is killed as hung.
    """

    def __init__(self, file: Path, *, threads: int | None = None, timeout_s: float = WORKER_TIMEOUT_S) -> None:
        self.file = file
        self.timeout_s = timeout_s
        self.lock = threading.Lock()
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        ours, theirs = socket.socketpair()
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # ggml would otherwise run gdb for a backtrace
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, "--fd", str(theirs.fileno()), "--threads",
                 str(threads or cpu_threads()), str(file)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=env)
        self._channel = Channel(ours)
        self._reader = threading.Thread(target=self._read_stderr, name=f"llama.cpp stderr {file.name}", daemon=True)
        self._reader.start()
        log.info("started llama.cpp worker", extra={"file": str(file), "pid": self._proc.pid})

    def _read_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._tail.append(line.decode("utf-8", errors="replace").rstrip())

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _death(self, action: str) -> BitsmithError:
        """The error for a worker that vanished while `action` ran: signal, exit code, llama.cpp's last words."""
        try:
            code = self._proc.wait(timeout=EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            code = self._proc.wait()
        self._reader.join(timeout=EXIT_WAIT_S)
        self._channel.close()
        how = f"exit code {code}"
        crashed = False
        if code < 0:
            sig = signal.Signals(-code)
            how = f"{sig.name} (exit code {128 - code})"
            crashed = sig in CRASH_SIGNALS
        message = f"the llama.cpp worker died {action} {self.file}: {how}; {self._last_words()}"
        log.error("llama.cpp worker died", extra={"file": str(self.file), "exit": code, "action": action})
        return FormatError(message) if crashed else ServiceUnavailableError(message)

    def _hung(self, action: str) -> BitsmithError:
        """Kills a worker that went silent for `timeout_s` while `action` ran; the error for its request.
        The pool replaces the dead worker on the next call, so the service serves on."""
        self._proc.kill()
        self._proc.wait()
        self._reader.join(timeout=EXIT_WAIT_S)
        self._channel.close()
        log.error("llama.cpp worker hung", extra={"file": str(self.file), "timeout_s": self.timeout_s,
                                                  "action": action})
        return ServiceUnavailableError(
            f"the llama.cpp worker made no progress for {self.timeout_s:g} s {action} {self.file} and was "
            f"killed ({WORKER_TIMEOUT_ENV} sets this limit); {self._last_words()}")

    def _last_words(self) -> str:
        lines = list(self._tail)
        marked = [ln for ln in lines if any(m in ln for m in ("GGML_ASSERT", "error", "failed", "terminate"))]
        said = marked[-3:] or lines[-3:]
        return "llama.cpp said: " + " | ".join(said) if said else "llama.cpp printed nothing"

    def _send(self, message: tuple[Any, ...], action: str) -> None:
        try:
            self._channel.send(message)
        except OSError:
            raise self._death(action) from None

    def _receive(self, action: str) -> list[bytes | tuple[Any, ...]]:
        """Every frame the worker has sent by now, at least one (a dead or hung worker raises)."""
        try:
            frames = self._channel.receive(self.timeout_s)
        except (EOFError, OSError):
            raise self._death(action) from None
        if not frames:
            raise self._hung(action)
        return frames

    def _checked(self, reply: bytes | tuple[Any, ...], action: str) -> tuple[Any, ...]:
        """`reply` as a message, or the `FormatError` of a failure llama.cpp reported."""
        assert isinstance(reply, tuple), "a reply is a message"
        if reply[0] == "error":
            raise FormatError(f"llama.cpp failed {action} {self.file}: {reply[1]}; {self._last_words()}")
        return reply

    def call(self, message: tuple[Any, ...], action: str) -> tuple[Any, ...]:
        """One request, one reply (a dead or hung worker or a failure in llama.cpp raises, naming `action`)."""
        with self.lock:
            self._send(message, action)
            (reply,) = self._receive(action)
            return self._checked(reply, action)

    def generate(self, prompt: str, max_new_tokens: int, should_stop: Callable[[], bool],
                 interval_s: float = 0.0) -> Iterator[str | GenerationStats]:
        """Text as the worker decodes it, then its `GenerationStats`.

        The worker joins the tokens of each `interval_s` (`bitsmith.runtimes.coalesce`); each piece here is
        all the text that arrived since the consumer last asked (see the module docstring): it never waits
        for more tokens, and the token count is the stats', not the number of pieces.
        """
        action = "while generating from"
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with self.lock:
            self._send(("generate", prompt, max_new_tokens, interval_s), action)
            finished = False  # the worker has ended this generation (stats sent, failed or died)
            try:
                while True:
                    try:
                        frames = self._receive(action)
                    except BitsmithError:
                        finished = True
                        raise
                    end = frames[-1] if isinstance(frames[-1], tuple) else None  # stats or error: the last frame
                    finished = end is not None
                    text = utf8.decode(b"".join(f for f in frames if isinstance(f, bytes)), final=finished)
                    if text:
                        yield text
                    if end is not None:
                        stats = self._checked(end, action)[1]
                        yield GenerationStats(prompt=Throughput(*stats["prompt"]),
                                              decode=Throughput(*stats["decode"]),
                                              generated_tokens=stats["generated"])
                        return
                    if should_stop():
                        break
            finally:
                if not finished:  # stopped early, or the consumer went away: let the worker finish first
                    self._send(("stop",), action)
                    while not isinstance(self._receive(action)[-1], tuple):
                        pass

    def close(self) -> None:
        """Ends the worker (closing its socket makes its loop return); kills it if it does not go."""
        with self.lock:
            self._channel.close()
            try:
                self._proc.wait(timeout=EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


class WorkerPool:
    """Live workers by file identity (path, mtime, size), least recently used evicted beyond `size`.

    A file is validated once per identity, when its worker starts; a file rewritten in place gets a fresh
    check and worker; a worker that died (or was killed as hung) is replaced, and its file checked again, on
    the next call. `timeout_s` is the workers' hang limit (None: `worker_timeout()` when each one starts).
    """

    def __init__(self, size: int = POOL_SIZE, *, timeout_s: float | None = None) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._workers: collections.OrderedDict[tuple[str, int, int], LlamaWorker] = collections.OrderedDict()

    def get(self, file: Path) -> LlamaWorker:
        """The live worker of `file`, or a new one once the file passes `bitsmith.formats.gguf.validate`."""
        from bitsmith.formats.gguf import validate

        try:
            stat = file.stat()
        except FileNotFoundError:
            raise NotFoundError(f"GGUF file {file} does not exist") from None
        key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size)
        retired = []
        with self._lock:
            worker = self._workers.get(key)
            if worker is not None and not worker.alive:
                del self._workers[key]
                worker = None
            if worker is None:
                if importlib.util.find_spec("llama_cpp") is None:
                    raise UnsupportedError(f"{file}: running GGUF needs llama-cpp-python, which is not installed")
                validate(file)  # byte-level check before llama.cpp parses anything
                retired = [self._workers.pop(k) for k in list(self._workers) if k[0] == key[0]]
                worker = self._workers[key] = LlamaWorker(file, timeout_s=self.timeout_s or worker_timeout())
            self._workers.move_to_end(key)
            while len(self._workers) > self.size:
                retired.append(self._workers.popitem(last=False)[1])
        for old in retired:
            old.close()
        return worker

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), collections.OrderedDict()
        for worker in workers:
            worker.close()


_POOL = WorkerPool()
"""The process's live workers (like `bitsmith.runtimes`' reference-model cache): created empty, no process
starts until a GGUF file is first run."""


# ----------------------------------------------------------------------------------------------------------
# The torch-facing model.


@dataclass(frozen=True, slots=True)
class CausalOutput:
    """logits [batch, seq, vocab] (float32) of fresh windows; llama.cpp keeps no cache across calls."""

    logits: torch.Tensor
    past_key_values: None = None


class GgufCausalLM(torch.nn.Module):
    """llama.cpp's model of a validated GGUF artifact, run by a worker process (see the module docstring)."""

    def __init__(self, path: Path, *, pool: WorkerPool | None = None) -> None:
        from bitsmith.formats.gguf import gguf_file

        super().__init__()
        self.file = gguf_file(path)
        self.worker = (pool or _POOL).get(self.file)
        self._scored = Throughput(tokens=0, seconds=0.0)
        # llama.cpp holds the weights; this empty parameter tells torch-side callers the model is on the CPU.
        self.anchor = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, past_key_values: None = None, use_cache: bool = False
                ) -> CausalOutput:
        if use_cache or past_key_values is not None:
            raise ConfigError("llama.cpp keeps its own KV cache: decode with GgufCausalLM.generate")
        rows = []
        for window in input_ids.detach().cpu().tolist():
            _, logits, seconds = self.worker.call(("score", window), "while scoring with")
            self._scored = self._scored + Throughput(tokens=len(window), seconds=seconds)
            rows.append(torch.from_numpy(logits))
        return CausalOutput(logits=torch.stack(rows))

    def scored(self) -> Throughput:
        """Tokens scored and llama.cpp's seconds spent on them since this model was made."""
        return self._scored

    def tokenize_file(self, file: Path) -> torch.Tensor:
        """The whole text file as llama.cpp tokenizes it with the file's vocabulary, LongTensor [T]."""
        from bitsmith.calib.data import _read_text

        _, tokens = self.worker.call(("tokenize", _read_text(Path(file))), "while tokenizing with")
        return torch.tensor(tokens, dtype=torch.long)

    def generate(self, prompt: str, max_new_tokens: int, should_stop: Callable[[], bool],
                 interval_s: float = 0.0) -> Iterator[str | GenerationStats]:
        """Greedy text as llama.cpp decodes it (`LlamaWorker.generate`), then the run's `GenerationStats`."""
        return self.worker.generate(prompt, max_new_tokens, should_stop, interval_s)

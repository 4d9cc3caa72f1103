"""The llama.cpp worker process: one GGUF file loaded by llama-cpp-python, answering its parent over a socket.

Started by `bitsmith.formats.gguf.runtime.LlamaWorker` as ``python -m bitsmith.formats.gguf.worker``; see
that module for why llama.cpp runs out of process. This module is kept light on purpose: it imports numpy
and llama-cpp-python, not torch, so a worker (and with it the first request on a file) starts in a fraction
of a second rather than the seconds torch's import takes.

`Channel` is the framing both ends speak: requests, replies and stats are pickled messages; a generated
token's bytes go as a zero byte and the raw bytes, so the per-token path pickles nothing.
"""

from __future__ import annotations

import argparse
import math
import pickle
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from bitsmith.runtimes import coalesce

MIN_CONTEXT = 512
"""The smallest context a worker loads: windows and prompts shorter than this share one."""

_LENGTH = struct.Struct("!i")  # multiprocessing.connection's framing: a big-endian length before each frame
_LONG_LENGTH = struct.Struct("!Q")  # after a length of -1, for frames of 2 GiB and more
_PIECE = 0  # a frame starting with this byte is a token's bytes; any other is a pickle (opcode PROTO, 0x80)
_SPLIT_WRITE = 1 << 16  # frames from this size are written after their header rather than copied behind it
_READ_BYTES = 1 << 20


class Channel:
    """One end of the socket pair: frames of bytes, each after its length (multiprocessing.connection's).

    Requests, replies and stats are pickled messages; a generated token goes as a zero byte and its raw
    bytes, so the per-token path pickles nothing. Reads are buffered: one `receive` returns every frame the
    peer has written by then, which is what lets the service join the tokens that waited into one chunk.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._buf = bytearray()

    def send(self, message: tuple[Any, ...]) -> None:
        self._write(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def send_piece(self, data: bytes) -> None:
        self._write(bytes((_PIECE,)) + data)

    def _write(self, frame: bytes) -> None:
        n = len(frame)
        header = _LENGTH.pack(n) if n <= 0x7FFFFFFF else _LENGTH.pack(-1) + _LONG_LENGTH.pack(n)
        if n < _SPLIT_WRITE:
            self._sock.sendall(header + frame)
        else:
            self._sock.sendall(header)
            self._sock.sendall(frame)

    def pending(self) -> bool:
        """Whether the peer has written something not yet received (or closed its end); never blocks."""
        return bool(self._buf) or bool(self._poll.poll(0))

    def receive(self, timeout_s: float | None) -> list[bytes | tuple[Any, ...]]:
        """Every complete frame the peer has written by now (pieces as bytes, messages as tuples), waiting
        for the first while bytes keep coming, or until `timeout_s` passes without any (None: forever), in
        which case the answer is []. EOFError: the peer closed its end."""
        frames = self._complete()
        while not frames:
            ready = self._poll.poll(None if timeout_s is None else math.ceil(timeout_s * 1e3))
            if not ready:
                return []
            data = self._sock.recv(_READ_BYTES)  # readable: returns at once
            if not data:
                raise EOFError("the peer closed the socket")
            self._buf += data
            frames = self._complete()
        return frames

    def _complete(self) -> list[bytes | tuple[Any, ...]]:
        """The whole frames at the front of the buffer, taken out of it."""
        frames: list[bytes | tuple[Any, ...]] = []
        buf, at = self._buf, 0
        while len(buf) - at >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buf, at)
            start = at + _LENGTH.size
            if size == -1:
                if len(buf) - start < _LONG_LENGTH.size:
                    break
                (size,) = _LONG_LENGTH.unpack_from(buf, start)
                start += _LONG_LENGTH.size
            if len(buf) - start < size:
                break
            frames.append(bytes(buf[start + 1:start + size]) if buf[start] == _PIECE
                          else pickle.loads(buf[start:start + size]))
            at = start + size
        del buf[:at]
        return frames

    def close(self) -> None:
        self._sock.close()



class _Engine:
    """llama.cpp's model of one file inside the worker; the context grows when a request needs more."""

    def __init__(self, file: str, threads: int) -> None:
        self.file = file
        self.threads = threads
        self.llm: Any = None

    def _ensure_context(self, n_tokens: int) -> Any:
        """A context of at least `n_tokens`, one batch wide (so a window is one decode); reloads to grow.

        A context longer than a window scores it exactly as one of its own length would: positions start
        at 0 and the unused cache cells are masked.
        """
        import llama_cpp

        if self.llm is None or self.llm.n_ctx() < n_tokens:
            if self.llm is not None:
                self.llm.close()
            n_ctx = max(n_tokens, MIN_CONTEXT)
            self.llm = llama_cpp.Llama(self.file, n_ctx=n_ctx, n_batch=n_ctx, n_threads=self.threads,
                                       n_threads_batch=self.threads, verbose=True)
        return self.llm

    def tokenize(self, text: str) -> list[int]:
        tokens: list[int] = self._ensure_context(0).tokenize(text.encode("utf-8"), add_bos=False, special=True)
        return tokens

    def score(self, tokens: list[int]) -> tuple[np.ndarray, float]:
        """Logits [len(tokens), vocab] of one window decoded from an empty cache, and the decode's seconds."""
        import llama_cpp

        llm = self._ensure_context(len(tokens))
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        llm.reset()
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            start = time.perf_counter()
            status = llama_cpp.llama_decode(llm.ctx, batch)
            seconds = time.perf_counter() - start
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status} on a window of {len(tokens)} tokens")
            n_vocab = llm.n_vocab()
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(len(tokens) * n_vocab,))
            return logits.reshape(len(tokens), n_vocab).copy(), seconds
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)

    def generate(self, channel: Channel, prompt: str, max_new_tokens: int, interval_s: float) -> None:
        """Greedy tokens' bytes sent as pieces, joined by `coalesce` over `interval_s`, until EOS,
        `max_new_tokens` or a ("stop",); then ("stats", …). Joining here rather than in the service spares
        the service a wake-up per token (which, with llama.cpp's threads on every core, waits for one).
        The bytes go undecoded: a character split over two tokens is joined by the reader."""
        import llama_cpp

        tokens = self.tokenize(prompt)
        if not tokens:
            raise ValueError("the prompt gives no tokens")
        llm = self._ensure_context(len(tokens) + max_new_tokens)
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        n_vocab = llm.n_vocab()
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        prompt_s = time.perf_counter() - start
        decode = [0.0, 0]  # seconds and steps of the decode passes after the prompt's
        generated = 0

        def pieces() -> Iterator[bytes]:
            nonlocal generated
            while generated < max_new_tokens:
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
                token = int(logits.argmax())
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    return
                generated += 1
                yield llm.detokenize([token])
                if generated == max_new_tokens or channel.pending():
                    return  # done, or the caller sent ("stop",): the main loop drops that message
                start = time.perf_counter()
                llm.eval([token])
                decode[0] += time.perf_counter() - start
                decode[1] += 1

        for piece in coalesce(pieces(), interval_s):
            assert isinstance(piece, bytes), "the decode loop yields bytes only"
            channel.send_piece(piece)
        channel.send(("stats", {"prompt": (len(tokens), prompt_s), "decode": (decode[1], decode[0]),
                                "generated": generated}))


def _serve(fd: int, file: str, threads: int) -> None:
    """The worker's loop: requests in, replies out, until the parent closes the socket."""
    channel = Channel(socket.socket(fileno=fd))
    engine = _Engine(file, threads)
    handlers: dict[str, Callable[..., Any]] = {
        "tokenize": lambda text: ("tokens", engine.tokenize(text)),
        "score": lambda tokens: ("logits", *engine.score(tokens)),
    }
    while True:
        try:
            requests = channel.receive(None)
        except EOFError:
            return
        for request in requests:
            assert isinstance(request, tuple), "the parent sends messages only"
            kind, *args = request
            try:
                if kind == "generate":
                    engine.generate(channel, *args)
                elif kind in handlers:
                    channel.send(handlers[kind](*args))
                # else: a ("stop",) that arrived after its generation had already ended
            except (ValueError, RuntimeError) as exc:  # llama-cpp-python's load / decode / tokenize failures
                channel.send(("error", f"{type(exc).__name__}: {exc}"))



def _main() -> None:
    parser = argparse.ArgumentParser(description="llama.cpp worker for one GGUF file (started by bitsmith)")
    parser.add_argument("--fd", type=int, required=True, help="socket to the parent, inherited")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("file")
    args = parser.parse_args()
    _serve(args.fd, args.file, args.threads)


if __name__ == "__main__":
    _main()

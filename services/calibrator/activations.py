"""Where the calibrator keeps the activations that flow from one block to the next.

`Activations.STORE` (`bitsmith_services.registry`) writes them to the artifact store like every other
tensor, so any calibrator replica (or a restarted one) can continue a job. That costs a file write and
two passes of sha256 over the whole calibration set per block (4.3 GB for 128 x 2048 tokens of a
4096-wide model, 8.6 GB at 8192 wide): seconds per block, on a GPU more than the block's compute.

`Activations.HOST` keeps them in this process's memory instead (page-locked when the model computes on
a GPU). Nothing is written: only this calibrator can resolve the reference it hands out, and it holds
the latest two per job and stream (the current block's inputs and outputs; asymmetric calibration runs a
second stream, the float model's) until the job's Release, plus the
held-out rows a parallel-mode Advance keeps for the block's Finish (a few samples per block). Since the
tensor never leaves this process, the reference's `sha256` is not a digest of its bytes (hashing 4.3 GB
per block cost seconds and protected nothing) but a random handle, `HOST_HANDLE` followed by 32 hex
digits: a reference matches only the very tensor it was minted for, and a store read of it can never
succeed (a handle is no sha256), so a lost tensor fails with a clear error instead of being replaced.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict

import torch
from bitsmith.errors import NotFoundError
from bitsmith.store import ArtifactStore, TensorRef, dtype_name

KEPT_PER_STREAM = 2
"""A block's inputs and its outputs: nothing older is read again by the block loop."""

HOST_HANDLE = "host:"
"""Prefix of the `sha256` field of a reference to activations held in a calibrator's memory."""


class HostActivations:
    """The latest activations of each job, by store key, in this process's memory."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, dict[str, OrderedDict[str, tuple[TensorRef, torch.Tensor]]]] = {}
        self._held_out: dict[str, dict[int, torch.Tensor]] = {}

    def put(self, job_id: str, key: str, name: str, tensor: torch.Tensor, *, stream: str = "inputs") -> TensorRef:
        """Hold `tensor` under `key` (dropping the older activations of the job's `stream`); a reference to
        it alone."""
        ref = TensorRef(key=key, name=name, dtype=dtype_name(tensor.dtype), shape=tuple(int(d) for d in tensor.shape),
                        sha256=HOST_HANDLE + secrets.token_hex(16))
        with self._lock:
            held = self._jobs.setdefault(job_id, {}).setdefault(stream, OrderedDict())
            held[key] = (ref, tensor)
            held.move_to_end(key)
            while len(held) > KEPT_PER_STREAM:
                held.popitem(last=False)
        return ref

    def get(self, job_id: str, ref: TensorRef, store: ArtifactStore) -> torch.Tensor:
        """The tensor `ref` names: held here when it matches exactly, else read (and checked) from the store."""
        with self._lock:
            streams = self._jobs.get(job_id, {}).values()
            held = next((s[ref.key] for s in streams if ref.key in s), None)
        if held is not None and held[0] == ref:
            return held[1]
        try:
            return store.get_tensor(ref)
        except NotFoundError:
            raise NotFoundError(
                f"activations {ref.key!r} are neither held by this calibrator nor in the store: a calibrator "
                "keeping activations in host memory was restarted, or another replica served the job; rerun it"
            ) from None

    def keep_held_out(self, job_id: str, block: int, rows: torch.Tensor) -> None:
        """Hold a block's held-out input rows until `drop_held_out` (a copy: not a view of the whole set)."""
        rows = rows.clone()
        with self._lock:
            self._held_out.setdefault(job_id, {})[block] = rows

    def held_out(self, job_id: str, block: int) -> torch.Tensor | None:
        """The held-out input rows kept for `block`; None when none are held."""
        with self._lock:
            return self._held_out.get(job_id, {}).get(block)

    def drop_held_out(self, job_id: str, block: int) -> None:
        with self._lock:
            held = self._held_out.get(job_id)
            if held is not None:
                held.pop(block, None)
                if not held:
                    del self._held_out[job_id]

    def release(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)
            self._held_out.pop(job_id, None)

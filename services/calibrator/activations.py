"""Where the calibrator keeps the activations that flow from one block to the next.

`Activations.STORE` (`bitsmith_services.registry`) writes them to the artifact store like every other
tensor, so any calibrator replica (or a restarted one) can continue a job. That costs a file write and
two passes of sha256 over the whole calibration set per block (4.3 GB for 128 x 2048 tokens of a
4096-wide model in float32, 8.6 GB at 8192 wide): seconds per block, on a GPU more than the block's compute.

`Activations.HOST` keeps them in this process's memory instead (page-locked when the model computes on
a GPU), and `Activations.DEVICE` on the device the model computes on: no copy crosses the bus per block,
and no page-locked buffer of gigabytes is allocated per block (pinning one costs seconds), at the price
of device memory for a block's inputs and outputs (`fits_on_device`). Either way nothing is written: only
this calibrator can resolve the reference it hands out, and it holds the latest two per job and stream
(the current block's inputs and outputs; asymmetric calibration runs a second stream, the float
model's) until the job's Release, plus the held-out rows a parallel-mode Advance keeps for the block's
Finish (a few samples per block). Since the
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
from bitsmith.errors import ConfigError, NotFoundError
from bitsmith.store import ArtifactStore, TensorRef, dtype_name

KEPT_PER_STREAM = 2
"""A block's inputs and its outputs: nothing older is read again by the block loop."""

DEVICE_SETS = 4
"""How many calibration sets' worth of device memory `Activations.DEVICE` asks to be free at a job's start:
each stream's inputs and outputs of a block (two streams with asymmetric calibration), or one stream's
and room for the block's own working set."""

HOST_HANDLE = "host:"
"""Prefix of the `sha256` field of a reference to activations held in a calibrator's memory."""


def fits_on_device(hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A job's first activations (`hidden`, on the host) moved to `device`, where `Activations.DEVICE` keeps
    them; refused up front, with the numbers, where `DEVICE_SETS` of them would not fit in its free memory
    (a job should not run out of memory blocks later)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = hidden.numel() * hidden.element_size()
        if DEVICE_SETS * size > free:
            raise ConfigError(
                f"activations of {size / 2**30:.1f} GiB x {DEVICE_SETS} do not fit "
                f"in the {free / 2**30:.1f} GiB free on {device}: serve the calibrator with --activations host, or "
                "calibrate on fewer or shorter samples")
    return hidden.to(device)


class HeldActivations:
    """The latest activations of each job, by store key, held by this process (host or device memory)."""

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

    def drop_older(self, job_id: str, ref: TensorRef) -> None:
        """Drop what the stream holding `ref` holds from before it: a block's Advance, once it has its inputs,
        needs nothing older (so the outputs it makes take the memory of the inputs before)."""
        with self._lock:
            for held in self._jobs.get(job_id, {}).values():
                if ref.key in held:
                    while next(iter(held)) != ref.key:
                        held.popitem(last=False)

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

"""Byte mutations of a real file, as hypothesis strategies: truncations, flipped bytes, spliced-in junk and
huge integers written over length and count fields. Mutations aim at the header (where every number a reader
trusts lives); truncation cuts anywhere."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

HUGE = (0, 1, 2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1)
"""Values that break unchecked arithmetic: zero, sign and width boundaries, and counts no file can hold."""


def mutated(seed: bytes, header_end: int) -> st.SearchStrategy[bytes]:
    """Bytes derived from `seed` whose first `header_end` bytes are its header."""
    header_end = max(8, min(header_end, len(seed)))
    truncated = st.integers(0, len(seed) - 1).map(lambda n: seed[:n])
    flipped = st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda flips: _flip(seed, flips))
    spliced = st.tuples(st.integers(0, header_end), st.binary(max_size=64), st.integers(0, 64)).map(
        lambda s: seed[:s[0]] + s[1] + seed[s[0] + s[2]:])
    huge = st.tuples(st.integers(0, header_end - 8), st.sampled_from(HUGE) | st.integers(0, 2**64 - 1),
                     st.sampled_from(("<Q", "<I"))).map(lambda h: _write(seed, *h))
    return st.one_of(truncated, flipped, spliced, huge, st.binary(max_size=256))


def _flip(seed: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(seed)
    for at, value in flips:
        out[at] = value
    return bytes(out)


def _write(seed: bytes, at: int, value: int, fmt: str) -> bytes:
    packed = struct.pack(fmt, value % 2 ** (8 * struct.calcsize(fmt)))
    return seed[:at] + packed + seed[at + len(packed):]

"""The mocker's embedding vectors: deterministic unit vectors seeded from the token ids.

The same token ids (and `--seed`) give the same vector in every process and on every machine:
the seed is a SHAKE-256 digest of the ids as little-endian int32 (never Python's `hash()`,
which is salted per process), and the digest's bytes are the vector's values. Different inputs
give unrelated vectors, so tests can tell every input's vector apart and check its order.

`dimensions` shortens a vector as a Matryoshka model does: its first `dimensions` values,
renormalised to unit length (so a short vector is a prefix of the long one, rescaled).
"""

from __future__ import annotations

import hashlib
import math
import sys
from array import array
from collections.abc import Sequence

__all__ = ["mock_embedding"]

_CENTRE = 32767.5  # the mean of a uint16


def mock_embedding(
    token_ids: Sequence[int], size: int, dimensions: int | None = None, seed: int = 0
) -> list[float]:
    """A unit vector of `dimensions` (default `size`) values for `token_ids`."""
    ids = array("i", token_ids)
    if sys.byteorder == "big":
        ids.byteswap()
    key = (seed % 2**64).to_bytes(8, "little") + ids.tobytes()
    n = dimensions or size
    values = array("H", hashlib.shake_256(key).digest(2 * size)[: 2 * n])
    if sys.byteorder == "big":
        values.byteswap()
    centred = [v - _CENTRE for v in values]
    norm = math.sqrt(math.fsum(x * x for x in centred)) or 1.0
    return [x / norm for x in centred]

"""The padding rule model inputs follow, for the builder's gates and the gateway alike: int64 rows from column 0,
padded on the right; with sequence buckets (a TensorRT engine's profile lengths) to the smallest bucket that
holds the row."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt


def padded_width(length: int, buckets: tuple[int, ...] = ()) -> int:
    """Width a row of ``length`` tokens (specials included) is padded to: itself, or with ``buckets`` the smallest
    bucket that holds it."""
    return min((b for b in buckets if b >= length), default=length)


def right_pad(rows: Sequence[Sequence[int]], width: int | None = None, value: int = 0) -> npt.NDArray[np.int64]:
    """The int64 [rows, width] array model inputs are: each row from column 0, then ``value`` up to ``width``
    (default: the longest row)."""
    width = max(map(len, rows), default=0) if width is None else width
    out = np.full((len(rows), width), value, dtype=np.int64)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out

"""Dropout masks of the torch multi-adapter path: counter-based, so a whole segment's mask is a few tensor ops.

An entry (row, column) of a layer drops when a 16-bit uniform falls below `drop_threshold(p)`. The uniform is a
hash of (the row's key, the layer's site id, the column), where the row's key depends only on its sample's seed
and its index within the sample. So a sample's masks do not depend on its row in the microbatch, on the samples
or jobs around it, nor on how its job's global batch was split into microbatches (promise 1), and no Python loop
over samples runs per layer. (The Triton kernels draw theirs from Philox with the same inputs; the two streams
differ, each is consistent with itself.)

`SegmentDropout` applies one segment's mask: on CPU float32/bfloat16 tensors with csrc's native op (the mask drawn
in the pass that applies it, bit for bit the one `dropped_entries` draws, and never kept), else with torch ops on the
mask `dropped_entries` draws once and keeps for the backward.
"""

from __future__ import annotations

import functools

import torch

from lorafusion.ops import native

__all__ = ["drop_threshold", "mix_seed", "keep_scale", "row_keys", "dropped_entries", "SegmentDropout",
           "INT16_VALUES"]

INT16_VALUES = 1 << 16
_INT16_MIN = -(1 << 15)
_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# murmur3's 64-bit finaliser constants, and the golden-ratio increment.
_C1, _C2, _GOLDEN = _signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53), _signed(0x9E3779B97F4A7C15)
_LOW31 = (1 << 31) - 1


def drop_threshold(p: float) -> int:
    """How many of the 2^16 values of a 16-bit uniform draw drop an entry: dropout p is honoured to 1/65536
    (p = 0.05 drops with probability 3277/65536), and the kept entries are scaled by the exact inverse."""
    return min(round(p * INT16_VALUES), INT16_VALUES - 1)


def keep_scale(p: float) -> float:
    """1 / the exact keep probability of dropout p (see drop_threshold)."""
    return 1.0 / (1.0 - drop_threshold(p) / INT16_VALUES)


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), stable across processes and runs."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & _MASK64
    return state >> 1


def _fmix64(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on an int64 tensor (products wrap; `>>` is arithmetic, so its sign bits are masked)."""
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _C1
    x = x ^ ((x >> 33) & _LOW31)
    x = x * _C2
    return x ^ ((x >> 33) & _LOW31)


def row_keys(num_rows: int, samples: list[tuple[int, int, int]]) -> torch.Tensor:
    """Each row's dropout key ([num_rows] int64, on the CPU): a hash of its sample's seed and its index within
    the sample. `samples`: (start, end, seed) of every sample, in row order; rows of no sample get key 0."""
    seeds = torch.zeros(num_rows, dtype=torch.int64)
    first = torch.zeros(num_rows, dtype=torch.int64)
    if samples:
        starts = torch.tensor([s for s, _, _ in samples])
        lengths = torch.tensor([e - s for s, e, _ in samples])
        first_of_row = torch.repeat_interleave(starts, lengths)  # [rows in samples]
        packed_start = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        rows = first_of_row + torch.arange(len(first_of_row)) - packed_start
        mixed = _fmix64(torch.tensor([_signed(seed) for _, _, seed in samples], dtype=torch.int64))
        seeds[rows] = torch.repeat_interleave(mixed, lengths)
        first[rows] = first_of_row
    positions = torch.arange(num_rows) - first
    return _fmix64(seeds + positions * _GOLDEN)


_COLUMN_KEYS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _column_keys(pairs: int, device: torch.device) -> torch.Tensor:
    """[pairs] int64: one well-mixed key per pair of columns (each hash gives two 16-bit uniforms)."""
    key = (pairs, device)
    if key not in _COLUMN_KEYS:
        _COLUMN_KEYS[key] = _fmix64(torch.arange(1, pairs + 1, dtype=torch.int64, device=device) * _GOLDEN)
    return _COLUMN_KEYS[key]


@functools.lru_cache(maxsize=None)
def _site_key(site_id: int) -> int:
    """The layer's key, xor-ed into every row key of the layer (as an int64)."""
    return _signed(mix_seed(site_id, 0x5EED))


def dropped_entries(keys: torch.Tensor, site_id: int, columns: int, p: float) -> torch.Tensor:
    """Which entries of a [rows, columns] input dropout zeroes at layer `site_id` (bool [rows, columns]).

    keys: the rows' keys from row_keys (on the input's device). Each entry's uniform is the high half of
    (row key ^ layer key ^ column key) · C: the row and column keys are fully mixed, so one multiply gives two
    16-bit uniforms per 64-bit word, three passes over the mask in all.
    """
    pairs = -(-columns // 2)
    site = keys ^ _site_key(site_id)  # [rows]: the layer's own well-mixed row keys
    words = site[:, None] ^ _column_keys(pairs, keys.device)[None, :]  # [rows, pairs]
    # The high 32 bits as two int16 (low half first, as the bytes lie), narrowed to int32 first so that the compare
    # runs over one contiguous tensor (on the [rows, pairs, 4] int16 view's strided half it was slower); the
    # multiply and shift in place, since fresh int64 temporaries of this size cost more than the arithmetic.
    uniform = words.mul_(_C1).bitwise_right_shift_(32).to(torch.int32).view(torch.int16)  # [rows, 2 · pairs]
    dropped = uniform < _INT16_MIN + drop_threshold(p)
    return dropped if 2 * pairs == columns else dropped[:, :columns]


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


class SegmentDropout:
    """Dropout p of one segment's input [rows, columns] at layer `site_id`: `keys` [rows] are the rows' keys
    (row_keys)."""

    __slots__ = ("keys", "site_id", "columns", "p", "_mask")

    def __init__(self, keys: torch.Tensor, site_id: int, columns: int, p: float) -> None:
        self.keys, self.site_id, self.columns, self.p = keys, site_id, columns, p
        self._mask: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        """bool [rows, columns]: the entries that drop (dropped_entries), drawn on the first call and kept."""
        if self._mask is None:
            self._mask = dropped_entries(self.keys, self.site_id, self.columns, self.p)
        return self._mask

    def _native_args(self, *tensors: torch.Tensor) -> tuple | None:
        """The native op's trailing arguments for `tensors` ([rows, columns] each), or None where the torch ops run
        instead (the op checks their shapes against the keys)."""
        t = tensors[0]
        if t.device.type != "cpu" or t.dtype not in _NATIVE_DTYPES or not all(u.is_contiguous() for u in tensors) \
                or not native.enabled(t.device):
            return None
        return (self.keys, _column_keys(-(-self.columns // 2), t.device), _site_key(self.site_id),
                drop_threshold(self.p))

    def zeroed(self, x: torch.Tensor) -> torch.Tensor:
        """x [rows, columns] with the dropped entries zeroed (+0.0), a new tensor."""
        args = self._native_args(x)
        if args is not None:
            return native.dropout_zeroed(x, *args)
        return torch.where(self.mask(), 0.0, x)  # masked_fill's result, faster on CPU

    def add_kept_(self, out: torch.Tensor, t: torch.Tensor) -> None:
        """out += t with t's dropped entries zeroed (out and t [rows, columns]; t may be overwritten)."""
        args = self._native_args(t, out)
        if args is not None:
            native.dropout_add_kept_(out, t, *args)
        else:
            out += t.masked_fill_(self.mask(), 0.0)

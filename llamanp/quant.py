"""Low-precision storage: encoding float32 weights, widening them back.

An .lmw file (version 2 on, docs/lmw-format.md §3) may store its matrices in
fewer bits than float32; the arithmetic stays float32. This module is the
whole of that: the encoders the writer uses, and the decoders ("widening")
the model uses, layer by layer, just before the matrix products.

    dtype  bytes/weight  stored as                                   widening
    f32    4             binary32                                    none (a view)
    f16    2             IEEE binary16                               shift, mask, x 2^112
    bf16   2             the upper 16 bits of a binary32             one shift
    q8_0   1 + 1/16      int8 quants [.., n]; f16 scales [.., n/32]  one multiply

Every widening is exact: the float32 it produces is the value the stored
bits mean (an int8 times a binary16 needs at most 8 + 11 significant bits,
well inside binary32's 24), so a compressed model computes exactly what the
float32 model whose weights are the dequantized values computes.

The widening functions write into caller-owned float32 buffers and work
through them in pieces of up to 1M elements: each piece is decoded in two to
four passes while it is still in the CPU cache, instead of streaming the
whole tensor through memory once per pass.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import LlamanpError

#: the element types an .lmw tensor may have; all but f32 need format version 2 or later
DTYPES = ("f32", "f16", "bf16", "q8_0")
#: q8_0 groups this many consecutive values of a row under one scale
Q8_BLOCK = 32
#: the largest q8_0 block maximum: its scale max|x|/127 must fit in binary16
Q8_MAX = 65504.0 * 127

# Elements per piece when widening: 1M elements (4 MB of float32) stay in the
# L3 cache across the few passes each decoder makes. Smaller pieces would stay
# in L2, but each piece costs a few NumPy calls, and measured on SmolLM2's
# matrices the calls cost more than L3 does (bench/widen.py).
_PIECE = 1 << 20
# Elements per piece when encoding for the writer: 4M values (16 MB of float32)
# bound the encoders' temporaries whatever the tensor's size.
_ENCODE_PIECE = 1 << 22


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Stored size of a tensor of `shape` in `dtype` (q8_0: quants + scales)."""
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == "f32":
        return 4 * count
    if dtype in ("f16", "bf16"):
        return 2 * count
    if dtype == "q8_0":
        return count + 2 * (count // Q8_BLOCK)
    raise LlamanpError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")


def check_dtype(dtype: str) -> str:
    """`dtype` if it is a known storage type, else a one-line LlamanpError."""
    if dtype not in DTYPES:
        raise LlamanpError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


def _rows(x: np.ndarray) -> np.ndarray:
    """x as a 2-D [rows, last axis] array (a view for contiguous x)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


# --- encoders: float32 -> stored ----------------------------------------------------

def encode_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> IEEE binary16, rounding to nearest, ties to even.

    Finite values too large for binary16 (|x| > 65504) are an error rather
    than silently becoming infinities; infinities and NaNs stay what they are.
    """
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if np.isinf(h).any() and (np.isinf(h) & np.isfinite(x)).any():
        big = float(np.abs(x[np.isfinite(x)]).max())
        raise LlamanpError(f"value {big:.6g} is too large for f16 (largest 65504); "
                           "store this model as bf16 or f32")
    return h


def encode_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16, as uint16 bit patterns (the upper half of each
    binary32), rounding to nearest, ties to even.

    Rounding adds 0x7FFF plus the lowest kept bit to the 32-bit pattern and
    keeps the upper half; a carry out of the mantissa correctly bumps the
    exponent (up to infinity for the largest values, as IEEE rounding does).
    A NaN keeps its sign and the upper bits of its payload, and is made quiet
    (rounding could otherwise carry it into an infinity).
    """
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> 16) & 1
    out = ((bits + (lsb + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(bits.view(np.float32))
    if nan.any():
        out[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040
    return out


def _round_half_away(v: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (C's roundf).

    floor(|v|) and |v| - floor(|v|) are exact in floating point, so the
    comparison with 0.5 decides ties exactly (adding 0.5 first would not:
    0.49999997 + 0.5 rounds up to 1.0 in float32).
    """
    a = np.abs(v)
    whole = np.floor(a)
    whole += (a - whole) >= 0.5
    return np.copysign(whole, v)


def encode_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., n] (n a multiple of 32) -> (quants int8 [..., n], scales f16 [..., n/32]).

    Per block of 32 consecutive values of a row, as ggml's reference
    quantizer does it (so the result is bit-identical to llama.cpp's and the
    gguf package's Q8_0), all in float32:

        d = max|x| / 127            q = roundf(x * (1/d))   (q = 0 when d = 0)
        stored scale = binary16(d), round to nearest even;  x ~ scale * q

    Values whose block maximum exceeds 65504 * 127 (the scale would overflow
    binary16) and non-finite values are an error.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % Q8_BLOCK:
        raise LlamanpError(f"q8_0 needs rows whose length is a multiple of {Q8_BLOCK}, "
                           f"not shape {list(x.shape)}")
    blocks = x.reshape(-1, Q8_BLOCK)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    if not np.isfinite(amax).all():
        raise LlamanpError("q8_0 cannot store infinities or NaNs; store this model as f32")
    if amax.max(initial=0) > Q8_MAX:
        raise LlamanpError(f"value {float(amax.max()):.6g} is too large for q8_0 "
                           f"(largest {Q8_MAX:.6g}); store this model as bf16 or f32")
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    quants = _round_half_away(blocks * inv).astype(np.int8)
    scales = d.astype(np.float16)
    return (quants.reshape(x.shape),
            scales.reshape(*x.shape[:-1], x.shape[-1] // Q8_BLOCK))


def encode(x: np.ndarray, dtype: str) -> list[np.ndarray]:
    """The arrays whose bytes, one after the other, are `x` stored as `dtype`."""
    if dtype == "f32":
        return [np.ascontiguousarray(x, dtype="<f4")]
    if dtype == "f16":
        return [encode_f16(x)]
    if dtype == "bf16":
        return [encode_bf16(x)]
    if dtype == "q8_0":
        return list(encode_q8_0(x))
    raise LlamanpError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")


def encode_stream(x: np.ndarray, dtype: str) -> Iterator[np.ndarray]:
    """Like :func:`encode`, but in pieces of rows, for writing large tensors
    without float32-sized temporaries. Yields arrays to write in order: for
    q8_0 every piece's quants first, then all the scales (the stored layout
    puts the scales after all the quants)."""
    x = np.asarray(x)
    if dtype == "f32" or x.ndim == 0:
        yield from encode(x, dtype)
        return
    rows = _rows(x)
    step = max(1, _ENCODE_PIECE // rows.shape[1])
    scales = []
    for r in range(0, rows.shape[0], step):
        parts = encode(rows[r:r + step], dtype)
        yield parts[0]
        scales.extend(parts[1:])
    yield from scales


# --- decoders: stored -> float32 ("widening") --------------------------------------------

def _flat_out(out: np.ndarray, size: int) -> np.ndarray:
    """`out` as a 1-D view: it must be a C-contiguous float32 buffer of `size`."""
    if out.dtype != np.float32 or out.size != size or not out.flags.c_contiguous:
        raise LlamanpError(f"internal: cannot widen {size} values into "
                           f"{out.dtype}{list(out.shape)}")
    return out.reshape(-1)


_F16_SCALE = np.float32(2.0 ** 112)   # binary32 bias 127 - binary16 bias 15 = 112
# as int32: 0x8FFFFFFF, the sign bit and the 28 bits below the exponent's top three
_F16_KEEP = np.int32(-0x70000001)


def widen_f16(src: np.ndarray, out: np.ndarray, finite: bool = False) -> np.ndarray:
    """binary16 -> float32 into `out` (same shape, C-contiguous); returns `out`.

    Each binary16, read as an int16 and sign-extended to 32 bits, shifted
    left by 13, has its sign in bit 31, copies of it in bits 30..28, then
    the 5 exponent and 10 mantissa bits where binary32 keeps its exponent's
    low bits and its mantissa. Clearing bits 30..28 leaves a binary32 with
    the right sign and mantissa and an exponent 112 too small (binary16's
    bias is 15, binary32's 127) -- also for binary16 subnormals, which land
    on binary32 subnormals. Multiplying by 2^112 (exact: a power of two)
    fixes the exponent: three integer passes and one multiply, several
    times faster than NumPy's own float16 cast. Infinities and NaNs
    (exponent 31) come out as finite values of magnitude 2^16 or more,
    which no finite binary16 reaches, so a piece holding one is handed to
    NumPy's cast instead -- unless the caller knows (`finite`, see
    f16_finite) that `src` holds none, which saves the two passes that look.
    """
    bits = src.view(np.int16).reshape(-1)
    flat = _flat_out(out, bits.size)
    for lo in range(0, len(bits), _PIECE):
        b, o = bits[lo:lo + _PIECE], flat[lo:lo + _PIECE]
        o32 = o.view(np.int32)
        np.copyto(o32, b)
        o32 <<= 13
        o32 &= _F16_KEEP
        o *= _F16_SCALE
        if not finite and (o.max() >= 65536 or o.min() <= -65536):   # an inf or NaN here
            np.copyto(o, b.view(np.float16))
    return out


def f16_finite(src: np.ndarray) -> bool:
    """Whether binary16 `src` holds no infinity or NaN (exponent bits all ones)."""
    exponents = np.bitwise_and(src.view(np.uint16), 0x7C00)
    return not (exponents == 0x7C00).any()


def widen_bf16(src: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 (uint16 bit patterns) -> float32 into `out`; returns `out`.

    A bfloat16 is the upper half of a binary32, so widening puts each
    pattern into the upper half of a 32-bit word of `out`: zero-extend it
    (a plain copy into the uint32 view) and shift it left by 16 -- two
    passes at memory speed, faster than one ufunc that casts as it shifts.
    """
    bits = src.reshape(-1)
    o32 = _flat_out(out, bits.size).view(np.uint32)
    for lo in range(0, len(bits), _PIECE):
        o = o32[lo:lo + _PIECE]
        np.copyto(o, bits[lo:lo + _PIECE])
        o <<= 16
    return out


def widen_q8_0(quants: np.ndarray, scales: np.ndarray, out: np.ndarray) -> np.ndarray:
    """q8_0 -> float32 into `out` (the shape of `quants`); returns `out`.

    `scales` are the binary16 scales, or the same already widened to float32
    (Packed.keep_scales). Row piece by row piece: the int8 quants are
    converted into `out`, then multiplied in place by their block's scale,
    broadcast over the block.
    """
    q = _rows(quants)
    rows, n = q.shape
    _flat_out(out, q.size)
    q3 = q.reshape(rows, n // Q8_BLOCK, Q8_BLOCK)
    d = _rows(scales)
    o3 = out.reshape(rows, n // Q8_BLOCK, Q8_BLOCK)
    step = max(1, _PIECE // n)
    if d.dtype != np.float32:
        d32 = np.empty((min(step, rows), n // Q8_BLOCK), np.float32)
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        o = o3[lo:hi]
        np.copyto(o, q3[lo:hi])
        if d.dtype == np.float32:
            dd = d[lo:hi]
        else:
            dd = widen_f16(d[lo:hi], d32[:hi - lo])    # NumPy's own f16 cast is slow
        o *= dd[:, :, None]
    return out


# --- a stored tensor, viewed in place ------------------------------------------------

class Packed:
    """A read-only tensor in a compressed dtype (f16, bf16 or q8_0), viewed in
    place (e.g. in a memory-mapped file) and widened to float32 on demand.

    Row operations work on the first axis: `rows(a, b)` and `take(ids)` give
    smaller Packed tensors (views, resp. compact copies of those rows), and
    `widen(out)` decodes into a float32 buffer. `np.asarray(p)` is the whole
    tensor widened.

        emb.take(token_ids).widen()              # an embedding lookup
        w.rows(0, 512).widen(out=buf[:512])      # a slice of a matrix, no allocation
    """

    __slots__ = ("dtype", "shape", "data", "scales", "_finite", "_scales32")

    def __init__(self, dtype: str, data: np.ndarray, scales: Optional[np.ndarray] = None):
        if dtype not in ("f16", "bf16", "q8_0"):
            raise LlamanpError(f"internal: Packed cannot hold dtype {dtype!r}")
        if (scales is None) != (dtype != "q8_0"):
            raise LlamanpError("internal: q8_0, and only q8_0, has scales")
        self.dtype = dtype
        self.data = data          # float16 (f16), uint16 (bf16) or int8 quants (q8_0)
        self.scales = scales      # float16 [..., n/32], q8_0 only
        self.shape = tuple(data.shape)
        self._finite: Optional[bool] = None   # f16: no inf/NaN (looked at on first widen)
        self._scales32: Optional[np.ndarray] = None   # q8_0: keep_scales()

    @classmethod
    def from_buffer(cls, buffer, offset: int, dtype: str, shape: Sequence[int]) -> "Packed":
        """View a tensor stored as `dtype` at `offset` of `buffer` (format §3)."""
        shape = tuple(shape)
        count = int(np.prod(shape, dtype=np.int64))
        if dtype == "f16":
            return cls(dtype, np.frombuffer(buffer, "<f2", count, offset).reshape(shape))
        if dtype == "bf16":
            return cls(dtype, np.frombuffer(buffer, "<u2", count, offset).reshape(shape))
        if dtype == "q8_0":
            quants = np.frombuffer(buffer, np.int8, count, offset).reshape(shape)
            scales = np.frombuffer(buffer, "<f2", count // Q8_BLOCK, offset + count)
            return cls(dtype, quants, scales.reshape(*shape[:-1], -1))
        raise LlamanpError(f"internal: Packed cannot hold dtype {dtype!r}")

    @classmethod
    def encode(cls, x: np.ndarray, dtype: str) -> "Packed":
        """`x` (float32) encoded as `dtype`, in memory."""
        return cls(dtype, *encode(x, dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Packed({self.dtype}, shape={list(self.shape)})"

    def rows(self, start: int, stop: int) -> "Packed":
        """Rows start..stop-1 (first axis), as views."""
        scales = None if self.scales is None else self.scales[start:stop]
        part = Packed(self.dtype, self.data[start:stop], scales)
        part._finite = self._finite or None    # rows of a finite tensor are finite
        if self._scales32 is not None:
            part._scales32 = self._scales32[start:stop]
        return part

    def take(self, ids) -> "Packed":
        """The rows `ids` (any integer index array), copied compactly."""
        ids = np.asarray(ids, dtype=np.intp)
        scales = None if self.scales is None else self.scales[ids]
        return Packed(self.dtype, self.data[ids], scales)

    def widen(self, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The tensor as float32, written into `out` (C-contiguous float32 of
        this shape) when given, else into a new array."""
        if out is None:
            out = np.empty(self.shape, np.float32)
        elif out.shape != self.shape:
            raise LlamanpError(f"internal: cannot widen {self!r} into {list(out.shape)}")
        if self.dtype == "f16":
            return widen_f16(self.data, out, finite=self.look_finite())
        if self.dtype == "bf16":
            return widen_bf16(self.data, out)
        scales = self.scales if self._scales32 is None else self._scales32
        return widen_q8_0(self.data, scales, out)

    def look_finite(self) -> bool:
        """f16: whether the tensor holds no inf/NaN, looked at once and
        remembered (widening then skips its own look). Other dtypes: True."""
        if self._finite is None:
            self._finite = self.dtype != "f16" or f16_finite(self.data)
        return self._finite

    def keep_scales(self) -> int:
        """q8_0: widen the scales to float32 now and keep them, so that every
        later widen() saves that step (a twelfth more memory than the q8_0
        tensor itself); the bytes kept. Other dtypes: nothing, 0."""
        if self.dtype != "q8_0":
            return 0
        if self._scales32 is None:
            d = _rows(self.scales)
            self._scales32 = widen_f16(d, np.empty(d.shape, np.float32))
        return self._scales32.nbytes

    def __array__(self, dtype=None, copy=None):
        wide = self.widen()
        return wide if dtype is None else wide.astype(dtype, copy=False)

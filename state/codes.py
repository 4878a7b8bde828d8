"""Quantized embedding codes: the compact form in which LoopFM's per-user history stores the FM's codes.

Public surface: ``quantize``, ``dequantize``, ``pack``, ``unpack``, ``pack_int4``, ``unpack_int4``,
``qmax``, ``payload_len``, ``HEADER``.

LoopFM's autoencoder ends in ``tanh``, so a code ``z`` lies in ``[-1, 1]``; the history store keeps up to
~200 of them per user, so every byte per code counts. A code is stored as small integers and one scale:

* **Symmetric, per row**: ``scale = max|z| / qmax`` and ``q = round(z / scale)``, clamped to
  ``[-(qmax + 1), qmax]``. ``qmax`` is 127 for int8 and 7 for int4 (so int4 values lie in ``[-8, 7]``).
  Per-row scales use the full integer range even when a code is small (a tanh code rarely reaches 1).
  The scale is a float32; a row of zeros gets ``scale = 0`` and dequantizes to exact zeros.
* **Error bound**: rounding moves each element by at most half a step, so
  ``|dequantize(q, scale) - z| <= scale / 2`` element-wise (up to float32 rounding: float32 input is
  worked on in float32, and ``q * scale`` is a float32 product; both add ~1e-7 relative), and
  since ``scale <= 1 / qmax`` when ``|z| <= 1``, the error is at most ``1 / (2 * qmax)``: 0.0039 for int8,
  0.071 for int4. No clamping ever bites because ``|z| / scale <= qmax`` by construction.
* **Storage** (``pack``/``unpack``): a 7-byte little-endian header ``bits u8 | d u16 | scale f32``, then
  the payload: ``d`` int8 bytes, or for int4 two values per byte (element ``2i`` in the low nibble,
  ``2i + 1`` in the high nibble, the last high nibble zero when ``d`` is odd), ``ceil(d / 2)`` bytes. The
  header makes a stored code self-describing, so codes written under another ``bits`` setting (or by an
  FM version with another ``d``) still decode.

``quantize`` takes one code ``(d,)`` or a batch ``(n, d)`` and is vectorized over the batch (the history
store quantizes a whole write batch in one call); ``pack``/``unpack`` handle one row.

>>> import numpy as np
>>> z = np.array([0.6, -1.0, 0.3, 0.0], dtype=np.float32)
>>> q, scale = quantize(z)
>>> q.tolist(), bool(scale == np.float32(1 / 127))
([76, -127, 38, 0], True)
>>> bool(np.all(np.abs(dequantize(q, scale) - z) <= scale / 2))
True
>>> q4, s4 = quantize(z, bits=4)
>>> q4.tolist()
[4, -7, 2, 0]
>>> buf = pack(q4, s4, bits=4)
>>> len(buf)  # 7-byte header + 4 values in 2 bytes
9
>>> back, s, bits = unpack(buf)
>>> back.tolist(), bits, bool(s == s4)
([4, -7, 2, 0], 4, True)
"""

from __future__ import annotations

import struct

import numpy as np

from loopline.errors import ConfigError

__all__ = ["quantize", "dequantize", "pack", "unpack", "pack_int4", "unpack_int4", "qmax", "payload_len",
           "HEADER"]

HEADER = struct.Struct("<BHf")  # bits, d, scale: the 7 bytes in front of every packed code
_BITS = (8, 4)


def qmax(bits: int) -> int:
    """The largest positive level: 127 for int8, 7 for int4 (the negative side goes one further).

    >>> qmax(8), qmax(4)
    (127, 7)
    """
    if bits not in _BITS:
        raise ConfigError(f"bits: must be 8 or 4, got {bits!r}")
    return (1 << (bits - 1)) - 1


def payload_len(d: int, bits: int) -> int:
    """Bytes of a packed code's payload (without the header).

    >>> payload_len(64, 8), payload_len(64, 4), payload_len(5, 4)
    (64, 32, 3)
    """
    return d if bits == 8 else (d + 1) // 2


def quantize(z: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray | np.float32]:
    """Symmetric per-row quantization of ``z`` (``(d,)`` or ``(n, d)``, finite floats).

    Returns ``(q, scale)``: ``q`` int8 with ``z``'s shape, ``scale`` float32 (a scalar for one row, an
    ``(n,)`` array for a batch). For ``bits=4`` the values lie in ``[-8, 7]``, still one per int8 element;
    ``pack`` (or ``pack_int4``) puts two in a byte.
    """
    top = qmax(bits)
    a = np.asarray(z)
    if a.dtype != np.float32:  # float32 codes are worked on in float32 (half the memory traffic)
        a = a.astype(np.float64)
    if a.ndim not in (1, 2) or a.shape[-1] == 0:
        raise ConfigError(f"z: must have shape (d,) or (n, d) with d >= 1, got {a.shape}")
    m = np.abs(a).max(axis=-1, initial=0)  # max|z| per row (NaN or inf if an element is); initial=0
    # is 2x faster here than without (another numpy inner loop)
    if not np.isfinite(m).all():
        raise ConfigError("z: must be finite (no NaN or infinity)")
    scale = (m / top).astype(np.float32)
    s = scale.astype(a.dtype)
    inv = np.divide(1, s, out=np.zeros_like(s), where=s > 0)  # a zero row has scale 0 and stays 0
    q = a * (inv[..., None] if a.ndim == 2 else inv)
    np.rint(q, out=q)
    np.clip(q, -top - 1, top, out=q)
    return q.astype(np.int8), (scale if a.ndim == 2 else np.float32(scale))


def dequantize(q: np.ndarray, scale) -> np.ndarray:
    """``q * scale`` as float32; ``q`` is ``(d,)`` with a scalar scale or ``(n, d)`` with ``(n,)`` scales."""
    qa = np.asarray(q)
    s = np.asarray(scale, dtype=np.float32)
    if qa.ndim == 2:
        s = s.reshape(-1, 1)
    return qa.astype(np.float32) * s


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two int4 values per byte along the last axis: ``(..., d)`` int8 in ``[-8, 7]`` -> ``(..., ceil(d/2))``
    uint8 (element ``2i`` in the low nibble). An odd ``d`` is padded with a zero high nibble.

    >>> pack_int4(np.array([1, -1, 7], dtype=np.int8)).tolist()
    [241, 7]
    """
    qa = np.asarray(q, dtype=np.int8)
    if qa.min(initial=0) < -8 or qa.max(initial=0) > 7:
        raise ConfigError("q: int4 values must lie in [-8, 7]")
    u = qa.view(np.uint8) & 0x0F
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.zeros(u.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, d: int) -> np.ndarray:
    """Inverse of ``pack_int4``: ``(..., ceil(d/2))`` uint8 -> ``(..., d)`` int8 in ``[-8, 7]``.

    >>> unpack_int4(np.array([241, 7], dtype=np.uint8), 3).tolist()
    [1, -1, 7]
    """
    p = np.asarray(packed, dtype=np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    s = out[..., :d].view(np.int8)
    return np.where(s > 7, s - 16, s).astype(np.int8)


def pack(q: np.ndarray, scale, bits: int = 8) -> bytes:
    """One quantized row ``(d,)`` and its scale -> bytes: the 7-byte header, then the payload."""
    qa = np.asarray(q, dtype=np.int8)
    if qa.ndim != 1 or not 1 <= qa.shape[0] <= 0xFFFF:
        raise ConfigError(f"q: must have shape (d,) with 1 <= d <= 65535, got {qa.shape}")
    qmax(bits)
    body = qa.tobytes() if bits == 8 else pack_int4(qa).tobytes()
    return HEADER.pack(bits, qa.shape[0], float(scale)) + body


def unpack(buf: bytes, offset: int = 0) -> tuple[np.ndarray, np.float32, int]:
    """Inverse of ``pack`` (reading from ``buf[offset:]``): ``(q int8 (d,), scale float32, bits)``."""
    if len(buf) - offset < HEADER.size:
        raise ConfigError(f"buf: too short for a packed code ({len(buf) - offset} bytes)")
    bits, d, scale = HEADER.unpack_from(buf, offset)
    n = payload_len(d, bits) if bits in _BITS else -1
    start = offset + HEADER.size
    if n < 0 or len(buf) - start < n:
        raise ConfigError(f"buf: not a packed code (bits={bits}, d={d}, {len(buf) - start} payload bytes)")
    raw = np.frombuffer(buf, dtype=np.uint8, count=n, offset=start)
    q = raw.view(np.int8).copy() if bits == 8 else unpack_int4(raw, d)
    return q, np.float32(scale), bits

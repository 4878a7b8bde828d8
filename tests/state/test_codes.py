"""Quantized embedding codes: error bounds for int8 and int4, shapes, packing round trips, errors."""

import numpy as np
import pytest

from loopline.errors import ConfigError
from loopline.state.codes import (HEADER, dequantize, pack, pack_int4, payload_len, qmax, quantize, unpack,
                                  unpack_int4)

# float32 work and the float32 product q * scale add ~1e-7 relative to the ideal bound
SLACK = 1e-6


def tanh_codes(n, d, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return np.tanh(rng.normal(size=(n, d)) * 2.0).astype(dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_error_is_at_most_half_a_step_and_so_at_most_one_over_2_qmax(bits, dtype):
    z = tanh_codes(5000, 37, seed=bits, dtype=dtype)
    z[0] = 1.0  # the extremes are representable exactly
    z[1] = -1.0
    q, scale = quantize(z, bits)
    err = np.abs(dequantize(q, scale).astype(np.float64) - z.astype(np.float64))
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (5000,)
    assert np.all(err <= scale[:, None].astype(np.float64) / 2 * (1 + SLACK) + 1e-9)
    assert err.max() <= 1 / (2 * qmax(bits)) * (1 + SLACK)
    assert np.all(scale <= np.float32(1 / qmax(bits)) * (1 + SLACK))
    # the largest |z| of each row maps to +-qmax: the whole range is used
    assert np.all(np.abs(q).max(axis=1) == qmax(bits))


def test_int4_values_stay_in_minus_8_to_7():
    q, _ = quantize(tanh_codes(1000, 16), bits=4)
    assert q.min() >= -8 and q.max() <= 7


def test_one_row_gives_a_scalar_scale_and_matches_the_batch():
    z = tanh_codes(3, 8)
    qb, sb = quantize(z)
    q1, s1 = quantize(z[1])
    assert q1.shape == (8,) and np.ndim(s1) == 0 and isinstance(s1, np.float32)
    assert np.array_equal(q1, qb[1]) and s1 == sb[1]
    assert dequantize(q1, s1).shape == (8,) and dequantize(qb, sb).dtype == np.float32


def test_a_row_of_zeros_has_scale_zero_and_dequantizes_exactly():
    z = np.zeros((2, 5), np.float32)
    z[1] = [0.1, 0, 0, -0.2, 0]
    q, s = quantize(z)
    assert s[0] == 0 and not q[0].any()
    assert np.array_equal(dequantize(q, s)[0], np.zeros(5, np.float32))


@pytest.mark.parametrize("bits,d", [(8, 64), (8, 1), (4, 64), (4, 7), (4, 1)])
def test_pack_unpack_round_trip(bits, d):
    z = tanh_codes(1, d, seed=d)[0]
    q, s = quantize(z, bits)
    buf = pack(q, s, bits)
    assert isinstance(buf, bytes) and len(buf) == HEADER.size + payload_len(d, bits)
    back, s2, b2 = unpack(buf)
    assert np.array_equal(back, q) and s2 == s and b2 == bits and back.dtype == np.int8
    # unpack reads at an offset (the history store's values have a prefix)
    back, s3, _ = unpack(b"xyz" + buf, offset=3)
    assert np.array_equal(back, q) and s3 == s


def test_int4_packs_two_values_per_byte_for_every_value():
    vals = np.arange(-8, 8, dtype=np.int8)
    packed = pack_int4(vals)
    assert packed.dtype == np.uint8 and packed.shape == (8,)
    assert np.array_equal(unpack_int4(packed, 16), vals)
    # odd length: the last high nibble is padding
    assert np.array_equal(unpack_int4(pack_int4(vals[:5]), 5), vals[:5])
    # batched along the last axis
    m = np.stack([vals, vals[::-1]])
    assert np.array_equal(unpack_int4(pack_int4(m), 16), m)


def test_int4_halves_the_payload():
    assert payload_len(64, 4) * 2 == payload_len(64, 8)


def test_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^bits:"):
        quantize(np.zeros(3), bits=5)
    with pytest.raises(ConfigError, match=r"^z:"):
        quantize(np.array([0.1, np.nan]))
    with pytest.raises(ConfigError, match=r"^z:"):
        quantize(np.array([0.1, np.inf]))
    with pytest.raises(ConfigError, match=r"^z:"):
        quantize(np.zeros((2, 0)))
    with pytest.raises(ConfigError, match=r"^q:"):
        pack_int4(np.array([8], np.int8))
    with pytest.raises(ConfigError, match=r"^buf:"):
        unpack(b"\x08\x40")
    with pytest.raises(ConfigError, match=r"^buf:"):
        unpack(HEADER.pack(8, 10, 1.0) + b"\x00" * 3)

"""The NumPy TwELL encoder/decoder: round trips, ordering, overflow, partial tiles."""

import numpy as np
import pytest

from twell import format as fmt


def _sparse(rng, m, h, density):
    pre = rng.standard_normal((m, h)).astype(np.float32)
    mask = rng.random((m, h)) < density
    return np.where(mask, np.abs(pre) + 1e-3, -np.abs(pre)).astype(np.float32)


@pytest.mark.parametrize("slots", fmt.SLOTS_CHOICES)
@pytest.mark.parametrize("m,h", [(1, 8), (7, 264), (129, 512), (33, 5632), (3, 1000)])
def test_round_trip_without_overflow(rng, slots, m, h):
    pre = _sparse(rng, m, h, density=min(0.05, (slots - 1) / 256 / 3))
    p = fmt.encode(pre, slots)
    assert p.words.shape == (m, fmt.row_words(h, slots))
    assert p.words.dtype == np.uint32
    assert fmt.check_packed(p.words, h, slots) == []
    dense, counts = fmt.decode(p.words, h, slots)
    expected = np.where(pre > 0, fmt.round_to_bf16(pre), 0)
    if (counts <= slots - 1).all():
        np.testing.assert_array_equal(dense, expected)
    np.testing.assert_array_equal(counts, fmt.tile_counts(pre))


def test_word_layout_by_hand():
    pre = np.full((1, 300), -1.0, dtype=np.float32)
    pre[0, 5] = 1.5      # tile 0, column 5
    pre[0, 3] = 2.0      # tile 0, column 3 (must come first: ascending order)
    pre[0, 256 + 40] = 0.25  # tile 1 (partial: 44 columns), column 40
    p = fmt.encode(pre, 32)
    w = p.words.reshape(2, 32)
    assert w[0, 0] == 2 and w[1, 0] == 1
    assert w[0, 1] == (0x4000 << 16) | 3          # bf16(2.0) = 0x4000
    assert w[0, 2] == (0x3FC0 << 16) | 5          # bf16(1.5) = 0x3FC0
    assert w[1, 1] == (0x3E80 << 16) | 40         # bf16(0.25) = 0x3E80
    assert (w[0, 3:] == 0).all() and (w[1, 2:] == 0).all()
    assert p.overflow_rows.size == 0


def test_relu_semantics_zero_negative_zero_and_tiny():
    pre = np.array([[0.0, -0.0, -1e-30, 1e-30, np.float32(1e-45), 3.0, 0, 0]], dtype=np.float32)
    p = fmt.encode(pre, 32)
    w = p.words[0]
    # kept iff > 0 in fp32: 1e-30, the smallest denormal and 3.0
    assert w[0] == 3
    assert [int(x & 0xFFFF) for x in w[1:4]] == [3, 4, 5]
    # the smallest fp32 denormal rounds to bf16 +0: still an entry (the decision is made in fp32)
    assert int(w[2] >> 16) == 0


def test_bf16_rounding_is_nearest_even():
    vals = np.array([1.0, 1.00390625, 1.01171875, 1.0 + 2**-8 + 2**-20, 3.14159], dtype=np.float32)
    bits = fmt.float_to_bf16_bits(vals)
    assert bits[0] == 0x3F80
    assert bits[1] == 0x3F80           # exactly halfway -> even
    assert bits[2] == 0x3F82           # halfway, odd below -> up to even
    assert bits[3] == 0x3F81           # just above halfway -> up
    back = fmt.bf16_bits_to_float(bits)
    assert abs(back[4] - 3.14159) < 2**-7 * 4


@pytest.mark.parametrize("slots", fmt.SLOTS_CHOICES)
def test_overflow_keeps_true_count_prefix_and_lists_rows(rng, slots):
    m, h = 50, 5632
    pre = _sparse(rng, m, h, 0.003)
    dense_rows = [3, 17, 49]
    pre[dense_rows[0], :256] = 1.0                      # a full tile: count 256
    pre[dense_rows[1], 1024:1280] = -1.0
    pre[dense_rows[1], 1024:1024 + slots] = 2.0         # exactly capacity + 1
    pre[dense_rows[2]] = np.abs(pre[dense_rows[2]]) + 1  # every column active
    pre[10, 512:512 + slots - 1] = 1.0                  # exactly at capacity: no overflow
    pre[10, 512 + slots - 1:768] = -1.0
    p = fmt.encode(pre, slots)
    assert fmt.check_packed(p.words, h, slots) == []
    np.testing.assert_array_equal(p.overflow_rows, np.array(dense_rows, dtype=np.int32))
    w = p.words.reshape(m, -1, slots)
    assert w[3, 0, 0] == 256
    assert w[17, 4, 0] == slots
    assert w[10, 2, 0] == slots - 1
    # the stored prefix is the first slots-1 columns in order
    cols = w[3, 0, 1:] & 0xFFFF
    np.testing.assert_array_equal(cols, np.arange(slots - 1))
    assert p.stats["overflow_rows"] == 3
    assert p.stats["max_tile_count"] == 256
    assert p.stats["overflow_tiles"] == int((fmt.tile_counts(pre) > slots - 1).sum())
    assert p.stats["active"] == int((pre > 0).sum())
    assert p.stats["max_row_count"] == h


def test_all_zero_rows_and_empty():
    p = fmt.encode(np.zeros((4, 520), np.float32), 64)
    assert (p.words == 0).all()
    assert p.stats["active"] == 0 and p.overflow_rows.size == 0
    p0 = fmt.encode(np.zeros((0, 256), np.float32), 32)
    assert p0.words.shape == (0, 32)


def test_check_packed_detects_violations(rng):
    pre = _sparse(rng, 8, 512, 0.05)
    p = fmt.encode(pre, 32)
    good = p.words.copy()
    assert fmt.check_packed(good, 512, 32) == []
    row = int(np.argmax(good.reshape(8, 2, 32)[:, 0, 0] >= 2))
    bad = good.copy().reshape(8, 2, 32)
    bad[row, 0, [1, 2]] = bad[row, 0, [2, 1]]                # unsorted
    assert any("ascending" in s for s in fmt.check_packed(bad.reshape(8, 64), 512, 32))
    bad = good.copy().reshape(8, 2, 32)
    bad[0, 0, 31] = 0xDEADBEEF if bad[0, 0, 0] < 31 else bad[0, 0, 31]  # garbage past the count
    if good.reshape(8, 2, 32)[0, 0, 0] < 31:
        assert any("zero" in s for s in fmt.check_packed(bad.reshape(8, 64), 512, 32))
    bad = good.copy().reshape(8, 2, 32)
    bad[1, 1, 0] = 300                                        # count > tile width
    assert any("count" in s for s in fmt.check_packed(bad.reshape(8, 64), 512, 32))


def test_bad_arguments():
    with pytest.raises(ValueError, match="slots"):
        fmt.encode(np.zeros((1, 8), np.float32), 16)
    with pytest.raises(ValueError, match="shape"):
        fmt.decode(np.zeros((2, 5), np.uint32), 256, 32)
    with pytest.raises(ValueError, match=r"\[M, H\]"):
        fmt.encode(np.zeros(8, np.float32), 32)

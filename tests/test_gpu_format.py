"""GPU pack/unpack against the NumPy encoder: bit-exact, poisoned outputs, odd shapes, overflow."""

import numpy as np
import pytest

import gpu_support as gs
from twell import format as fmt
from twell import ops

pytestmark = pytest.mark.gpu

POISON32 = 0xDEADBEEF


def _pre(rng, m, h, kind):
    pre = rng.standard_normal((m, h), dtype=np.float32)
    if kind == "sparse":
        pre -= 2.6                                   # ~0.5% positive
    elif kind == "overflow":
        pre -= 0.3                                   # ~38% positive: most tiles overflow
    elif kind == "rows":
        pre -= 2.6
        pre[::3] = -1.0                              # all-zero rows
        pre[1::7] = np.abs(pre[1::7]) + 0.1          # fully dense rows
        pre[2::5, :8] = 0.0                          # exact zeros are not active
        pre[2::5, 8:16] = -0.0
    return pre


def _check_against_numpy(dev, pre_host, pre_dev, slots):
    m, h = pre_host.shape
    words = fmt.row_words(h, slots)
    packed = dev.full((m, words), "uint32", POISON32)
    rows = dev.full((m,), "int32", -7)
    stats = dev.full((8,), "uint64", 0xABABABABABABABAB)
    ops.pack(pre_dev, slots, packed=packed, overflow_rows=rows, stats=stats)
    exp = fmt.encode(pre_host, slots)
    got = dev.host(packed)
    assert fmt.check_packed(got, h, slots) == []
    np.testing.assert_array_equal(got, exp.words)
    st = ops.read_stats(stats)
    n = st["overflow_rows"]
    assert n == exp.overflow_rows.size
    np.testing.assert_array_equal(dev.host(rows)[:n], exp.overflow_rows)
    for k in ("rows", "active", "overflow_tiles", "max_tile_count", "format"):
        assert st[k] == exp.stats[k], k
    return packed


@pytest.mark.parametrize("slots", fmt.SLOTS_CHOICES)
@pytest.mark.parametrize("m", [1, 7, 129, 300])
@pytest.mark.parametrize("h", [8, 264, 2816, 5632])
@pytest.mark.parametrize("kind", ["sparse", "overflow", "rows"])
def test_pack_fp32_matches_numpy(rng, slots, m, h, kind):
    dev = gs.adapter("cupy")
    pre = _pre(rng, m, h, kind)
    _check_against_numpy(dev, pre, dev.f32(pre), slots)


@pytest.mark.parametrize("slots", [32, 128])
@pytest.mark.parametrize("m,h", [(300, 5632), (7, 14336), (1, 65536)])
def test_pack_bf16_matches_numpy(rng, slots, m, h):
    dev = gs.adapter("cupy")
    pre = gs.round_bf16(_pre(rng, m, h, "rows"))
    _check_against_numpy(dev, pre, dev.bf16(pre), slots)


@pytest.mark.parametrize("slots", fmt.SLOTS_CHOICES)
def test_unpack_matches_numpy_decode(rng, slots):
    dev = gs.adapter("cupy")
    m, h = 129, 2816
    pre = _pre(rng, m, h, "overflow" if slots == 32 else "sparse")
    packed = _check_against_numpy(dev, pre, dev.f32(pre), slots)
    out = dev.full((m, h), "bfloat16", 0xFFFF)
    ops.unpack(packed, h, slots, out=out)
    dense, _ = fmt.decode(dev.host(packed), h, slots)
    np.testing.assert_array_equal(dev.host_f32(out), dense)


def test_pack_is_deterministic_and_works_on_a_side_stream(rng):
    dev = gs.adapter("cupy")
    pre = _pre(rng, 4096, 5632, "overflow")
    p_dev = dev.f32(pre)
    first = dev.host(ops.pack(p_dev, 32)[0])
    s = dev.stream()
    with dev.use_stream(s):
        again = ops.pack(p_dev, 32)[0]
        s.synchronize()
    np.testing.assert_array_equal(first, dev.host(again))


def test_pack_large_m(rng):
    dev = gs.adapter("cupy")
    m, h = 70000, 264                                # more rows than one compaction block row range
    pre = _pre(rng, m, h, "sparse")
    pre[rng.choice(m, 500, replace=False), :64] = 1.0  # 500 overflowed rows scattered over the range
    _check_against_numpy(dev, pre, dev.f32(pre), 32)


def test_torch_tensors_work_too(rng):
    pytest.importorskip("torch")
    dev = gs.adapter("torch")
    pre = _pre(rng, 129, 2816, "rows")
    _check_against_numpy(dev, pre, dev.f32(pre), 64)

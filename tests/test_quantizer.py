"""Group quantization: ranges, padding of a short last group, float16 scales, integers vs fake-quant."""

import numpy as np
import pytest
import torch

from signround_export.checkpoint.qweight import QuantWeight, Scheme
from signround_export.tune.quantizer import quantize, to_qweight


def weight(n=24, k=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.05


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, -1])
def test_rtn_integers_dequantize_to_the_fake_quant_weight(bits, sym, group):
    w = weight()
    scheme = Scheme(bits, group, sym)
    fq = quantize(w, scheme)
    qw = to_qweight(w, scheme)
    assert qw.q.max() <= 2**bits - 1
    # the integers are the truth: their dequantization is exactly the weight the tuning loss saw
    np.testing.assert_array_equal(qw.dequantize(), fq.weight.numpy())
    assert fq.offset is None
    np.testing.assert_array_equal(qw.zero, fq.zero.numpy())
    # float16 scales: what the checkpoint stores is what was used
    np.testing.assert_array_equal(qw.scale, qw.scale.astype(np.float16).astype(np.float32))
    if sym:
        assert (qw.zero == 2 ** (bits - 1)).all()
    # round-to-nearest errs by at most half a step, except at the clamped ends of the range (the
    # symmetric grid has one step less on its positive side; a rounded zero point shifts the grid)
    step = np.abs(qw.scale)[:, qw.group_index()]
    err = np.abs(qw.dequantize() - w.numpy())
    assert (err <= step + 1e-6).all()
    assert (err > step * 0.5 + 1e-6).mean() < (0.25 if bits == 2 else 0.02)


def test_short_last_group_uses_only_real_columns():
    """K=200 with groups of 64: the last group has 8 real columns; padding must not change its scale."""
    w = weight(k=200)
    qw = to_qweight(w, Scheme(4, 64, False))
    assert qw.scale.shape == (24, 4)
    alone = to_qweight(w[:, 192:], Scheme(4, 64, False))  # the same 8 columns as a group of their own
    np.testing.assert_array_equal(qw.scale[:, 3], alone.scale[:, 0])
    np.testing.assert_array_equal(qw.q[:, 192:], alone.q)


def test_symmetric_uses_the_full_range_on_the_larger_side():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0] * 8, [1.0, -0.5, 0.25, 0.0] * 8])
    qw = to_qweight(w, Scheme(4, 32, True))
    signed = qw.q.astype(int) - 8
    assert signed[0, 0] == -8 and signed[1, 0] == -8  # the larger magnitude maps to -8 in both rows
    assert qw.scale[0, 0] > 0 > qw.scale[1, 0]
    np.testing.assert_allclose(qw.dequantize(), w.numpy(), atol=1e-3)


def test_offsets_and_clipping_change_the_integers_and_carry_gradients():
    w = weight(n=4, k=64)
    scheme = Scheme(4, 32, False)
    v = torch.zeros(4, 2, 32, requires_grad=True)
    lo = torch.ones(4, 2, requires_grad=True)
    hi = torch.ones(4, 2, requires_grad=True)
    wq = quantize(w, scheme, v, lo, hi).weight
    ((wq - w) ** 2).sum().backward()
    assert v.grad.abs().sum() > 0 and lo.grad.abs().sum() > 0 and hi.grad.abs().sum() > 0
    rtn = to_qweight(w, scheme)
    pushed = to_qweight(w, scheme, torch.full((4, 2, 32), 0.49), lo.detach(), hi.detach())
    assert (pushed.q.astype(int) - rtn.q.astype(int)).max() == 1  # +0.49 rounds some values up, none by 2
    clipped = to_qweight(w, scheme, None, torch.full((4, 2), 0.5), torch.full((4, 2), 0.5))
    assert (np.abs(clipped.scale) < np.abs(rtn.scale)).all()


def test_all_zero_group_gets_a_finite_scale():
    w = torch.zeros(2, 64)
    for sym in (True, False):
        qw = to_qweight(w, Scheme(4, 32, sym))
        assert np.isfinite(qw.scale).all() and (qw.scale != 0).all()
        np.testing.assert_array_equal(qw.dequantize(), 0)


@pytest.mark.parametrize("bits,group,sub_bits", [(2, 16, 4), (4, 32, 6), (5, 32, 6)])
def test_float_offset_grid_is_the_k_quant_form_and_beats_integer_zero_points(bits, group, sub_bits):
    """Asymmetric K-quant grids: W = q * d * sc - dmin * m per sub-block, with sc, m sub_bits-bit integers;
    what the loss sees is exactly what the integers, scales and offsets give."""
    w = weight(n=16, k=512)
    w[2] = w[2].abs()  # a row with no negative weight: offsets 0
    scheme = Scheme(bits, group, False, sub_bits, float_offset=True)
    fq = quantize(w, scheme)
    qw = to_qweight(w, scheme)
    assert fq.zero is None and fq.offset is not None  # a float minimum, not an integer zero point
    assert (qw.zero == 0).all() and qw.offset is not None and (qw.offset[2] == 0).all()
    np.testing.assert_array_equal(qw.offset, fq.offset.numpy())
    np.testing.assert_array_equal(qw.dequantize(), fq.weight.numpy())
    limit = 2**sub_bits - 1
    for values in (qw.scale, qw.offset):  # per 256-weight super-block: one float16 step times 0..limit
        per_super = values.reshape(16, 2, -1).astype(np.float64)
        top = per_super.max(-1, keepdims=True)
        assert (per_super >= 0).all()
        steps = [t / m for t in top.ravel() for m in range(limit, 0, -1)
                 if t > 0 and np.float16(t / m) == t / m]
        assert steps, "no float16 step"
    free = to_qweight(w, Scheme(bits, group, False))  # integer zero points, free float16 scales
    err = lambda x: np.abs(x.dequantize() - w.numpy()).mean()  # noqa: E731
    assert err(qw) < err(free)  # a float minimum fits each group better than a rounded zero point


def test_schemes_and_weights_refuse_float_offsets_where_they_cannot_be():
    with pytest.raises(ValueError, match="a float offset is for asymmetric weights"):
        Scheme(4, 32, True, float_offset=True)
    with pytest.raises(ValueError, match="asymmetric K-quant grids hold float offsets"):
        Scheme(4, 32, False, 6)
    qw = to_qweight(weight(n=4, k=64), Scheme(4, 32, False, float_offset=True))
    qw.check()
    bad_shape = QuantWeight(qw.q, qw.scale, qw.zero, 4, 32, False, offset=qw.offset[:, :1])
    with pytest.raises(ValueError, match="offsets must be 4 x 2 finite values"):
        bad_shape.check()
    symmetric = QuantWeight(qw.q, qw.scale, np.full_like(qw.zero, 8), 4, 32, True, offset=qw.offset)
    with pytest.raises(ValueError, match="a symmetric weight cannot carry float offsets"):
        symmetric.check()


def test_round_ste_is_the_arithmetic_straight_through_estimator(monkeypatch):
    """round_ste's one pass gives what x + (round(x) - x).detach() gives: the same values (up to the sign
    of a zero) and, through a whole fake quantization, the very same gradients on every grid."""
    from signround_export.tune import quantizer

    x = torch.cat([torch.arange(-40, 41) / 4, torch.randn(1000) * 3, torch.randn(1000) * 1e-6,
                   torch.tensor([2.0**24 + 2, -(2.0**23) - 1, 0.49999997, -0.49999997])])
    assert torch.equal(quantizer.round_ste(x), x + (x.round() - x))

    def grads(schemes):
        g = torch.Generator().manual_seed(1)
        w = torch.randn(32, 256, generator=g)
        out = []
        for scheme in schemes:
            n_groups = 256 // scheme.group_size
            v = (torch.rand(32, n_groups, scheme.group_size, generator=g) - 0.5).requires_grad_()
            lo = (0.7 + 0.3 * torch.rand(32, n_groups, generator=g)).requires_grad_()
            hi = (0.7 + 0.3 * torch.rand(32, n_groups, generator=g)).requires_grad_()
            (quantize(w, scheme, v, lo, hi).weight * torch.randn(32, 256, generator=g)).sum().backward()
            out += [v.grad, lo.grad, hi.grad]
        return out

    schemes = [Scheme(4, 32, False), Scheme(3, 32, True), Scheme(2, 16, False, sub_scale_bits=4, float_offset=True),
               Scheme(6, 16, True, sub_scale_bits=8)]
    one_pass = grads(schemes)
    monkeypatch.setattr(quantizer, "round_ste", lambda t: t + (t.round() - t).detach())
    arithmetic = grads(schemes)
    for a, b in zip(one_pass, arithmetic):
        assert a.abs().sum() > 0
        assert torch.equal(a, b)

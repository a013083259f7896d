import pytest
import torch

from sensplan.sensitivity._quant import (
    SUPPORTED_BITS,
    dequantize,
    fake_quantize,
    pack_codes,
    packed_nbytes,
    qmax,
    quantize_per_channel,
    unpack_codes,
)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_round_trip_is_exact_and_compact(bits):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-qmax(bits), qmax(bits) + 1, (7, 5, 3), generator=g).to(torch.int8)
    data = pack_codes(q, bits)
    assert len(data) == packed_nbytes(q.numel(), bits)
    assert torch.equal(unpack_codes(data, bits, tuple(q.shape)), q)


def test_codes_are_symmetric_and_per_channel():
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 100  # one channel with a much larger range must not coarsen the others
    q, s = quantize_per_channel(w, 4)
    assert q.dtype == torch.int8 and s.shape == (4,)
    assert int(q.abs().max()) <= qmax(4)
    err = (dequantize(q, s) - w).abs().amax(dim=(1, 2, 3))
    assert err[0] < 0.5 and err[2] > 10 * err[0]


def test_error_shrinks_with_more_bits():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    errs = [float(((fake_quantize(w, b) - w) ** 2).mean()) for b in (2, 3, 4, 6, 8)]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < 1e-4


def test_two_bits_is_ternary():
    q, _ = quantize_per_channel(torch.randn(8, 64), 2)
    assert set(q.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_requantizing_quantized_weights_returns_the_same_codes(bits):
    """The executor relies on this: it extracts codes again after structural pruning."""
    torch.manual_seed(bits)
    w = torch.randn(12, 8, 3, 3)
    q1, s1 = quantize_per_channel(w, bits)
    q2, s2 = quantize_per_channel(dequantize(q1, s1), bits)
    assert torch.equal(q1, q2)
    assert torch.allclose(s1, s2, rtol=1e-6)


def test_unsupported_bits_are_rejected():
    with pytest.raises(ValueError, match="'bits' parameter"):
        quantize_per_channel(torch.randn(2, 2), 1)

import pytest
import torch

from rdkv_hf import quant


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 63, 64, 127, 1000])
def test_pack_unpack_exact_round_trip(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g)
    words = quant.pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (3, quant.packed_words(n, bits))
    assert torch.equal(quant.unpack(words, bits, n).long(), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_power_of_two_widths_waste_no_bits(bits):
    assert quant.packed_words(64, bits) * 32 == 64 * bits


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [-1, 0])
def test_dequantization_error_within_half_step(bits, dim):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(63, 33, generator=g) * 5 + 2
    x[3] *= 40  # an outlier row/column stretches its own range only
    codes, scale, minimum = quant.quantize(x, bits, dim)
    assert int(codes.max()) <= (1 << bits) - 1
    err = (quant.dequantize(codes, scale, minimum) - x).abs()
    assert (err <= scale.float() / 2 * (1 + 1e-4) + 1e-6).all()
    assert scale.dtype == minimum.dtype == torch.float16


def test_constant_slice_is_exact():
    x = torch.full((4, 16), 3.25)
    codes, scale, minimum = quant.quantize(x, 2, -1)
    assert torch.equal(quant.dequantize(codes, scale, minimum), x)


def test_fake_quantize_sentinels():
    x = torch.randn(5, 8)
    assert quant.fake_quantize(x, 16, -1) is x
    assert torch.equal(quant.fake_quantize(x, 0, -1), torch.zeros_like(x))


def test_bad_width_names_the_value():
    with pytest.raises(ValueError, match="got 9"):
        quant.pack(torch.zeros(1, 4, dtype=torch.long), 9)

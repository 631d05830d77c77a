"""Views for small images: shapes/dtypes kept, seeded determinism, each transform's defining property."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nas.data.views import ViewConfig, make_view, make_views, random_crop, random_cutout, random_noise, random_rotate


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 3, 7, 9)])
def test_views_keep_shape_dtype_and_are_deterministic(shape, dtype):
    x = torch.randn(shape, generator=_gen(0)).to(dtype)
    cfg = ViewConfig()
    a, b = make_views(x, cfg, 2, _gen(5))
    assert a.shape == x.shape and a.dtype == dtype and b.dtype == dtype
    a2, b2 = make_views(x, cfg, 2, _gen(5))
    torch.testing.assert_close(a, a2)
    torch.testing.assert_close(b, b2)
    assert not torch.allclose(a, b)  # two views differ
    c, _ = make_views(x, cfg, 2, _gen(6))
    assert not torch.allclose(a, c)
    assert torch.isfinite(a).all()


def test_crop_is_a_shift_of_the_padded_image():
    x = torch.randn(6, 2, 5, 5, generator=_gen(1))
    out = random_crop(x, 2, _gen(3))
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 5])
        ]
        assert matches, f"sample {i} is not a crop of the padded image"


def test_rotation_zero_is_identity_and_noise_has_the_asked_std():
    x = torch.randn(4, 1, 8, 8, generator=_gen(2))
    torch.testing.assert_close(random_rotate(x, 0.0, 0.0, _gen(0)), x)
    # any rotation keeps the centre pixel of an odd-sized constant image
    ones = torch.ones(2, 1, 9, 9)
    rotated = random_rotate(ones, 30.0, 0.0, _gen(0))
    assert rotated[:, :, 4, 4].allclose(torch.ones(2, 1))  # the centre pixel stays
    big = torch.zeros(4000, 1, 4, 4)
    noisy = random_noise(big, 0.3, _gen(1))
    assert float(noisy.std()) == pytest.approx(0.3, rel=0.02)


def test_cutout_zeroes_at_most_a_square():
    x = torch.ones(50, 1, 8, 8)
    out = random_cutout(x, 3, 1.0, _gen(4))
    zeros = (out == 0).flatten(1).sum(1)
    assert (zeros <= 9).all() and (zeros >= 4).all()  # a 3x3 square clipped at most to 2x2 in a corner
    untouched = random_cutout(x, 3, 0.0, _gen(4))
    torch.testing.assert_close(untouched, x)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        make_view(torch.randn(8, 8), ViewConfig())
    with pytest.raises(TypeError, match="floating-point"):
        make_view(torch.ones(2, 1, 8, 8, dtype=torch.int64), ViewConfig())
    with pytest.raises(ValueError, match="cutout_prob"):
        ViewConfig(cutout_prob=1.5)
    with pytest.raises(ValueError, match="num_views"):
        make_views(torch.randn(2, 1, 8, 8), ViewConfig(), 0)

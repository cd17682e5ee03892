"""Differentiable augmentation (DSA): shapes, linearity (what makes the adjoint's vector-Jacobian product
exact), reproducibility from the generator, and strict configuration."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from sslkd.data.augmentations import DSA_FAMILIES, DSAConfig, draw_dsa, dsa
from sslkd.errors import SslkdError


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), family=st.sampled_from(DSA_FAMILIES))
def test_each_family_is_affine_in_the_images(seed, family):
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(5, 3, 16, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    draw = draw_dsa(x.shape, DSAConfig(families=(family,)), generator)
    offset = draw(torch.zeros_like(x))  # non-zero only for colour's brightness shift
    combined = draw(2.0 * x - 3.0 * y) - offset
    torch.testing.assert_close(combined, 2.0 * (draw(x) - offset) - 3.0 * (draw(y) - offset))
    assert draw(x).shape == x.shape
    if family != "color":
        assert offset.abs().max() == 0


def test_the_same_generator_state_gives_the_same_augmentation_and_families_vary():
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = dsa(images, DSAConfig(), torch.Generator().manual_seed(7))
    again = dsa(images, DSAConfig(), torch.Generator().manual_seed(7))
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(1)
    families = {draw_dsa(images.shape, DSAConfig(), generator).family for _ in range(200)}
    assert families == set(DSA_FAMILIES)


def test_flip_and_crop_move_pixels_without_changing_their_values():
    images = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    generator = torch.Generator().manual_seed(3)
    flipped = draw_dsa(images.shape, DSAConfig(families=("flip",)), generator)(images)
    for original, out in zip(images, flipped):
        assert torch.equal(out, original) or torch.equal(out, original.flip(2))
    draw = draw_dsa(images.shape, DSAConfig(families=("crop",), crop=0.25), generator)
    shifted = draw(images)
    for original, out, dy, dx in zip(images, shifted, *draw.parameters):
        dy, dx = int(dy), int(dx)
        inner = out[:, max(dy, 0) : 8 + min(dy, 0), max(dx, 0) : 8 + min(dx, 0)]
        source = original[:, max(-dy, 0) : 8 + min(-dy, 0), max(-dx, 0) : 8 + min(-dx, 0)]
        assert torch.equal(inner, source)


@pytest.mark.parametrize(
    "kwargs",
    [{"families": ("colour",)}, {"families": ()}, {"crop": 1.0}, {"cutout": 0.0}, {"scale": 0.9}, {"brightness": -1}],
)
def test_bad_dsa_values_are_refused(kwargs):
    with pytest.raises(SslkdError):
        DSAConfig(**kwargs)

"""Properties of the KD, Barlow Twins, SimCLR and trajectory-matching losses."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from sslkd.losses import barlow_twins_loss, kd_mse_loss, per_example_kd_loss, simclr_loss, trajectory_matching_loss

seeds = st.integers(0, 2**31 - 1)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@given(seeds, st.integers(1, 16), st.integers(1, 16))
def test_kd_loss_is_non_negative_and_zero_exactly_at_the_target(seed, batch, dim):
    student, teacher = randn(seed, batch, dim), randn(seed + 1, batch, dim)
    assert kd_mse_loss(student, teacher) >= 0
    assert kd_mse_loss(teacher, teacher) == 0
    assert kd_mse_loss(student, teacher) > 0


@given(seeds, st.floats(0.01, 100.0))
def test_kd_loss_scales_quadratically_and_ignores_joint_translation(seed, scale):
    student, teacher, shift = randn(seed, 5, 7), randn(seed + 1, 5, 7), randn(seed + 2, 1, 7)
    base = kd_mse_loss(student, teacher)
    assert torch.isclose(kd_mse_loss(scale * student, scale * teacher), scale**2 * base, rtol=1e-9)
    assert torch.isclose(kd_mse_loss(student + shift, teacher + shift), base, rtol=1e-9)


@given(seeds)
def test_per_example_kd_loss_averages_to_the_batch_loss(seed):
    student, teacher = randn(seed, 9, 4), randn(seed + 1, 9, 4)
    assert torch.isclose(per_example_kd_loss(student, teacher).mean(), kd_mse_loss(student, teacher))


def test_kd_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        kd_mse_loss(torch.zeros(3, 4), torch.zeros(3, 5))


def decorrelated_views(seed: int, batch: int, dim: int) -> torch.Tensor:
    """[batch, dim] with zero-mean, unit-variance (biased), mutually uncorrelated columns."""
    centred = randn(seed, batch, dim)
    centred = centred - centred.mean(dim=0)
    q, _ = torch.linalg.qr(centred)
    return q * math.sqrt(batch)


@given(seeds, st.integers(2, 6))
def test_barlow_twins_is_zero_for_identical_decorrelated_views(seed, dim):
    z = decorrelated_views(seed, 32, dim)
    assert barlow_twins_loss(z, z.clone(), eps=0.0) < 1e-12


@given(seeds, st.integers(2, 6))
def test_barlow_twins_is_zero_for_perfectly_correlated_decorrelated_views(seed, dim):
    """Each dimension of view 2 a positive affine function of the same dimension of view 1: zero loss;
    pairing the dimensions wrongly (a cyclic shift) must cost at least one unit per dimension."""
    z = decorrelated_views(seed, 32, dim)
    scale, shift = randn(seed + 1, dim).abs() + 0.1, randn(seed + 2, dim)
    assert barlow_twins_loss(z, z * scale + shift, eps=0.0) < 1e-12
    assert barlow_twins_loss(z, torch.roll(z, 1, dims=1) * scale + shift, eps=0.0) > dim - 1e-6


@given(seeds)
def test_barlow_twins_is_positive_for_unrelated_views(seed):
    assert barlow_twins_loss(randn(seed, 64, 8), randn(seed + 1, 64, 8)) > 1.0


@given(seeds, st.integers(2, 8))
def test_barlow_twins_is_invariant_to_positive_affine_maps_per_dimension(seed, dim):
    z1, z2 = randn(seed, 40, dim), randn(seed, 40, dim) + 0.3 * randn(seed + 1, 40, dim)
    scale = randn(seed + 2, dim).abs() + 0.1
    shift = randn(seed + 3, dim)
    base = barlow_twins_loss(z1, z2, eps=0.0)
    moved = barlow_twins_loss(z1 * scale + shift, z2 * scale + shift, eps=0.0)
    assert torch.isclose(base, moved, rtol=1e-8)


@given(seeds)
def test_barlow_twins_changes_when_one_dimension_flips_sign(seed):
    """A negative scale is not an invariance: the loss must notice (the property test above can fail)."""
    z1 = randn(seed, 40, 4)
    z2 = z1 + 0.1 * randn(seed + 1, 40, 4)
    flipped = z2.clone()
    flipped[:, 0] *= -1
    assert barlow_twins_loss(z1, flipped) > barlow_twins_loss(z1, z2) + 1.0


@given(seeds)
def test_simclr_prefers_matching_views(seed):
    z = randn(seed, 16, 8)
    assert simclr_loss(z, z + 0.01 * randn(seed + 1, 16, 8)) < simclr_loss(z, randn(seed + 2, 16, 8))


@given(seeds, st.integers(2, 12), st.floats(0.1, 10.0))
def test_simclr_is_symmetric_in_the_views_and_ignores_each_projection_s_length_and_the_batch_order(seed, batch, scale):
    z1, z2 = randn(seed, batch, 6), randn(seed + 1, batch, 6)
    base = simclr_loss(z1, z2)
    assert torch.isclose(simclr_loss(z2, z1), base, rtol=1e-9)
    lengths = randn(seed + 2, batch, 1).abs() + 0.1
    assert torch.isclose(simclr_loss(scale * lengths * z1, z2), base, rtol=1e-9)
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    assert torch.isclose(simclr_loss(z1[order], z2[order]), base, rtol=1e-9)
    if batch > 2:  # pairing the views wrongly changes it (the invariances are not vacuous)
        assert not torch.isclose(simclr_loss(z1, torch.roll(z2, 1, dims=0)), base, rtol=1e-6)


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """NT-Xent written out: the 2B views v_1..v_2B (v_i and v_{i+B} are the two views of image i), cosine
    similarities s_ij; each view's loss is -log(exp(s_ip/τ) / sum_{k != i} exp(s_ik/τ)) with p its partner;
    the loss is their average."""
    views = [v for v in z1] + [v for v in z2]
    count, batch = len(views), len(z1)
    total = 0.0
    for i in range(count):
        partner = (i + batch) % count
        similarity = [float(views[i] @ views[k] / (views[i].norm() * views[k].norm())) for k in range(count)]
        denominator = sum(math.exp(similarity[k] / temperature) for k in range(count) if k != i)
        total += -math.log(math.exp(similarity[partner] / temperature) / denominator)
    return total / count


@given(seeds, st.integers(1, 6), st.integers(1, 5), st.floats(0.05, 2.0))
def test_simclr_equals_the_nt_xent_formula(seed, batch, dim, temperature):
    z1, z2 = randn(seed, batch, dim), randn(seed + 1, batch, dim)
    assert simclr_loss(z1, z2, temperature).item() == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-9)


def test_simclr_of_a_hand_computed_case():
    """B = 1, orthogonal views: the only other view is the partner, so the loss is -log 1 = 0 whatever τ;
    B = 2 with views (1,0),(0,1) | (1,0),(0,1) at τ = 1: each view's partner has similarity 1, the two
    others 0 and 0, so the loss is -log(e / (e + 2))."""
    assert simclr_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), 0.3).item() == pytest.approx(
        0.0, abs=1e-7
    )
    views = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert simclr_loss(views, views.clone(), 1.0).item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-12)


@given(seeds, st.integers(1, 50))
def test_matching_loss_is_one_without_a_step_and_zero_at_the_target(seed, size):
    start, target = randn(seed, size), randn(seed + 1, size)
    assert torch.isclose(trajectory_matching_loss(start, start, target), torch.tensor(1.0, dtype=torch.float64))
    assert trajectory_matching_loss(target, start, target) == 0
    assert trajectory_matching_loss(randn(seed + 2, size), start, target) >= 0


@given(seeds, st.floats(1e-3, 1e3), st.floats(-10, 10))
def test_matching_loss_is_invariant_to_joint_scaling_and_translation(seed, scale, shift):
    end, start, target = randn(seed, 20), randn(seed + 1, 20), randn(seed + 2, 20)
    base = trajectory_matching_loss(end, start, target)
    moved = trajectory_matching_loss(scale * end + shift, scale * start + shift, scale * target + shift)
    assert torch.isclose(base, moved, rtol=1e-7)


@given(seeds, st.floats(1e-3, 1e3))
def test_matching_loss_is_invariant_to_any_joint_translation_and_rotation_but_not_to_moving_one_point(seed, scale):
    """A vector shift and an orthogonal map applied to (end, start, target) leave it unchanged; moving the
    end alone halfway to the target does not (so the invariance above is not vacuous). A random shift of
    the end alone can leave ‖end − target‖ almost unchanged (hypothesis found one), halfway cannot: it
    quarters the numerator."""
    end, start, target, shift = randn(seed, 12), randn(seed + 1, 12), randn(seed + 2, 12), randn(seed + 3, 12)
    rotation, _ = torch.linalg.qr(randn(seed + 4, 12, 12))
    base = trajectory_matching_loss(end, start, target)
    moved = trajectory_matching_loss(*(scale * rotation @ v + shift for v in (end, start, target)))
    assert torch.isclose(base, moved, rtol=1e-8)
    halfway = trajectory_matching_loss(end + 0.5 * (target - end), start, target)
    assert torch.isclose(halfway, base / 4, rtol=1e-8) and not torch.isclose(halfway, base, rtol=1e-3)

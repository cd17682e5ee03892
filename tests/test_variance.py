"""Properties the variance argument relies on, and the ``sslkd variance`` stage end to end.

KD minibatch gradients are unbiased with finite-population variance σ²/B·(N−B)/(N−1) under sampling
without replacement; the relative-variance and dispersion estimators behave as statistics should.
(Barlow Twins and matching-loss invariances: tests/test_losses.py.)
"""

from __future__ import annotations

import itertools
import json
import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from test_cli import run, workspace  # noqa: F401  (the CLI workspace fixture)
from torch import nn

from sslkd.cli import main
from sslkd.data.augmentations import AugmentConfig
from sslkd.data.datasets import Normalisation
from sslkd.methods.experts import ExpertsConfig, build_student
from sslkd.methods.teacher import SSLConfig
from sslkd.methods.variance import (
    full_kd_gradient,
    kd_gradient,
    parameter_dispersion,
    relative_dispersion,
    relative_variance,
    sample_minibatches,
    ssl_gradient,
    train_runs,
)
from sslkd.models import ConvNetConfig

seeds = st.integers(0, 2**31 - 1)


def linear_problem(seed: int, size: int) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A float64 linear student on [size, 4] inputs regressing [size, 3] targets."""
    generator = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    inputs = torch.randn(size, 4, generator=generator, dtype=torch.float64)
    return model, inputs, torch.randn(size, 3, generator=generator, dtype=torch.float64)


def finite_population_variance(per_example: torch.Tensor, full: torch.Tensor, batch: int) -> float:
    """E‖g_B − ḡ‖² for the mean of ``batch`` of the N per-example gradients [N, P] drawn without
    replacement: σ²/B · (N − B)/(N − 1), σ² = mean_i ‖g_i − ḡ‖² (the textbook formula)."""
    size = len(per_example)
    sigma2 = float((per_example - full).pow(2).sum(dim=1).mean())
    return sigma2 / batch * (size - batch) / (size - 1) if size > 1 else 0.0


@given(seeds, st.integers(1, 5), st.integers(1, 6), st.integers(1, 40))
def test_minibatch_gradients_of_a_partition_average_to_the_full_gradient(seed, batches, batch, chunk):
    model, inputs, targets = linear_problem(seed, batches * batch)
    parts = torch.randperm(batches * batch, generator=torch.Generator().manual_seed(seed)).view(batches, batch)
    mean = torch.stack([kd_gradient(model, inputs[p], targets[p]) for p in parts]).mean(dim=0)
    full = full_kd_gradient(model, inputs, targets, chunk=chunk)
    assert torch.allclose(full, kd_gradient(model, inputs, targets), rtol=1e-10, atol=1e-12)
    assert torch.allclose(mean, full, rtol=1e-10, atol=1e-12)


def test_unequal_batches_would_bias_the_plain_average():
    """The partition property is not vacuous: with batches of 1 and 5 the plain average is off."""
    model, inputs, targets = linear_problem(0, 6)
    mean = (kd_gradient(model, inputs[:1], targets[:1]) + kd_gradient(model, inputs[1:], targets[1:])) / 2
    assert not torch.allclose(mean, full_kd_gradient(model, inputs, targets), rtol=1e-3)


@given(seeds, st.integers(2, 7), st.data())
def test_kd_gradient_variance_follows_the_finite_population_formula_exactly(seed, size, data):
    """Exhaustively over all C(N, B) minibatches: unbiased, variance σ²/B·(N−B)/(N−1) (0 at B = N)."""
    batch = data.draw(st.integers(1, size))
    model, inputs, targets = linear_problem(seed, size)
    full = full_kd_gradient(model, inputs, targets)
    per_example = torch.stack([kd_gradient(model, inputs[i : i + 1], targets[i : i + 1]) for i in range(size)])
    subsets = [list(c) for c in itertools.combinations(range(size), batch)]
    gradients = torch.stack([kd_gradient(model, inputs[s], targets[s]) for s in subsets])
    assert torch.allclose(gradients.mean(dim=0), full, rtol=1e-9, atol=1e-12)
    expected = finite_population_variance(per_example, full, batch) / float(full.pow(2).sum())
    assert math.isclose(relative_variance(gradients, full), expected, rel_tol=1e-8, abs_tol=1e-12)


@settings(max_examples=10, deadline=None)
@given(seeds, st.integers(2, 11))
def test_sampled_minibatches_match_the_formula_and_never_repeat_an_example(seed, batch):
    """Many sampled minibatches: the estimate lands on the without-replacement formula (with replacement
    it would be σ²/B, off by (N − 1)/(N − B) ≥ 10% here)."""
    size, count = 12, 20000
    model, inputs, targets = linear_problem(seed, size)
    minibatches = sample_minibatches(size, batch, count, torch.Generator().manual_seed(seed))
    assert minibatches.shape == (count, batch) and int(minibatches.min()) >= 0 and int(minibatches.max()) < size
    assert bool((minibatches.sort(dim=1).values.diff(dim=1) > 0).all()), "an example repeats inside a minibatch"
    full = full_kd_gradient(model, inputs, targets)
    per_example = torch.stack([kd_gradient(model, inputs[i : i + 1], targets[i : i + 1]) for i in range(size)])
    # the minibatch gradient of a mean-reduced loss is the mean of its per-example gradients (exhaustive test)
    estimate = relative_variance(per_example[minibatches].mean(dim=1), full)
    expected = finite_population_variance(per_example, full, batch) / float(full.pow(2).sum())
    assert estimate == pytest.approx(expected, rel=0.05)


@given(seeds, st.integers(1, 20), st.integers(1, 30))
def test_relative_variance_is_zero_for_identical_gradients(seed, count, dim):
    gradient = torch.randn(dim, generator=torch.Generator().manual_seed(seed)) + 0.1
    samples = gradient.expand(count, dim)
    assert relative_variance(samples, gradient) == 0
    if count > 1:
        assert relative_variance(samples) == pytest.approx(0, abs=1e-12)


@given(seeds, st.floats(1e-3, 1e3), st.integers(2, 30))
def test_relative_variance_is_scale_invariant_and_exact_on_a_known_spread(seed, scale, dim):
    generator = torch.Generator().manual_seed(seed)
    mean, offset = (
        torch.randn(dim, generator=generator, dtype=torch.float64),
        torch.randn(dim, generator=generator, dtype=torch.float64),
    )
    samples = torch.stack([mean + offset, mean - offset])
    known = float(offset.pow(2).sum() / mean.pow(2).sum())
    assert relative_variance(samples, mean) == pytest.approx(known, rel=1e-10)
    assert relative_variance(samples) == pytest.approx(2 * known, rel=1e-10)  # unbiased: divisor R − 1 = 1
    assert relative_variance(scale * samples, scale * mean) == pytest.approx(known, rel=1e-9)
    assert relative_variance(scale * samples) == pytest.approx(2 * known, rel=1e-9)


@given(seeds, st.integers(1, 5), st.integers(1, 6), st.integers(1, 10))
def test_identical_runs_have_zero_dispersion(seed, runs, snapshots, dim):
    run = torch.randn(snapshots, dim, generator=torch.Generator().manual_seed(seed))
    stacked = run.expand(runs, snapshots, dim)
    assert torch.equal(parameter_dispersion(stacked), torch.zeros(snapshots, dtype=torch.float64))
    assert torch.equal(relative_dispersion(stacked), torch.zeros(snapshots, dtype=torch.float64))


@given(seeds, st.integers(2, 5), st.integers(2, 6), st.floats(1e-2, 1e2), st.floats(-5, 5))
def test_relative_dispersion_is_a_share_and_ignores_joint_rescaling_and_translation(
    seed, runs, snapshots, scale, shift
):
    generator = torch.Generator().manual_seed(seed)
    init = torch.randn(1, 1, 7, generator=generator, dtype=torch.float64).expand(runs, 1, 7)
    paths = torch.cat(
        [init, init + torch.randn(runs, snapshots - 1, 7, generator=generator, dtype=torch.float64)], dim=1
    )
    share = relative_dispersion(paths)
    assert share[0] == 0 and bool(((share >= 0) & (share <= 1 + 1e-12)).all())
    assert torch.allclose(relative_dispersion(scale * paths + shift), share, rtol=1e-9)
    assert torch.allclose(
        parameter_dispersion(scale * paths + shift), scale**2 * parameter_dispersion(paths), rtol=1e-9
    )


def test_relative_dispersion_needs_a_shared_init():
    with pytest.raises(ValueError, match="share their initial snapshot"):
        relative_dispersion(torch.randn(3, 2, 5))


def tiny_training(objective: str) -> tuple[ExpertsConfig, torch.Tensor, torch.Tensor, Normalisation]:
    augment = AugmentConfig((0.5, 1.0), True, 0.8, 0.4, 0.4, 0.2, 0.2, 0.2)
    ssl = SSLConfig(objective if objective != "kd" else "barlow_twins", 16, 1, 8, 1e-3, 0.0, 5e-3, 0.5, augment)
    experts = ExpertsConfig(ConvNetConfig(4, 2), objective, 1, 2, 0.01, 0.9, 1e-4, 8, ssl, False, "float32", 0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(24, 3, 8, 8, generator=generator)
    return (
        experts,
        images,
        torch.randn(24, 6, generator=generator),
        Normalisation(torch.full((3,), 0.5), torch.full((3,), 0.25)),
    )


@pytest.mark.parametrize("objective", ["kd", "barlow_twins", "simclr"])
def test_seeded_runs_are_reproducible_and_differ_only_by_their_seeds(objective):
    experts, images, targets, normalisation = tiny_training(objective)

    def make_student(seed: int):
        return build_student(experts.student, (3, 8, 8), 6, seed)

    def runs(seeds_: list[int]) -> torch.Tensor:
        return train_runs(
            make_student,
            [7] * len(seeds_),
            [torch.Generator().manual_seed(s) for s in seeds_],
            images,
            targets,
            experts,
            normalisation,
        )[0]

    same = runs([1, 1, 1])
    assert torch.equal(parameter_dispersion(same), torch.zeros(3, dtype=torch.float64))
    different = runs([1, 2, 3])
    dispersion = relative_dispersion(different)
    assert dispersion[0] == 0 and bool((dispersion[1:] > 0).all())


def test_ssl_gradients_carry_augmentation_noise_and_kd_gradients_none():
    experts, images, targets, normalisation = tiny_training("barlow_twins")
    model = build_student(experts.student, (3, 8, 8), 6, 0)
    pixels = normalisation.invert(images)
    first, again, other = (
        ssl_gradient(model, pixels, normalisation.apply, experts.ssl, torch.Generator().manual_seed(s))
        for s in (1, 1, 2)
    )
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert torch.equal(kd_gradient(model, images, targets), kd_gradient(model, images, targets))


@pytest.mark.slow
def test_variance_stage_writes_the_claim_and_its_plots(workspace, capsys):  # noqa: F811
    for stage in ("data", "teacher", "represent"):
        assert main([stage]) == 0
    assert main(["variance"]) == 0
    results = json.loads((workspace / "results" / "variance.json").read_text())
    assert results["kind"] == "variance" and results["ssl_objective"] == "barlow_twins"
    assert results["grad_variance_ratio"] > 0 and results["dispersion_ratio"] > 0
    assert set(results["final_matching_loss"]) == {"kd", "ssl"}
    grads = results["gradient_variance"]
    assert grads["batch_sizes"] == [8, 16, 256] and {"kd", "barlow_twins", "simclr"} <= set(grads)
    assert len(results["matching"]["kd"]["losses"]) == results["matching"]["iterations"]
    assert len(results["dispersion"]["ssl"]["relative"]) == results["dispersion"]["epochs"][-1] + 1
    for name in ("variance_vs_batch_size.png", "dispersion_vs_epoch.png", "matching_loss_vs_iteration.png"):
        assert (workspace / "results" / name).read_bytes()[:4] == b"\x89PNG"
    sidecar = json.loads((workspace / "results" / "variance.json.meta.json").read_text())
    assert {"operative_config", "inputs"} <= set(sidecar)
    assert "seconds" not in sidecar  # timings would make a rerun's sidecar differ (docs/reliability.md)
    code, err = run(capsys, "variance", "--bind", "sslkd.variance.batch_sizes = (8, 5000)")
    assert code == 2 and "lower variance.batch_sizes" in err[-1]

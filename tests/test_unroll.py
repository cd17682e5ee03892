"""The exact adjoint unroll against the full autograd unroll, and the KD steps (eager and compiled)."""

from __future__ import annotations

import math
import weakref

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from sslkd.data.augmentations import DSA_FAMILIES, DSAConfig, draw_dsa
from sslkd.errors import SslkdError
from sslkd.losses import TARGET_LOSSES, kd_mse_loss
from sslkd.methods.experts import build_student
from sslkd.methods.kd_steps import KDSteps, train_kd
from sslkd.methods.unroll import SNAPSHOTS, match_trajectory, segment_lengths
from sslkd.models import ConvNetConfig, ParameterLayout, instance_norm, write_out_instance_norms


def random_problem(seed: int, size: int, dim: int, dtype: torch.dtype):
    """A width-3 ConvNet on 8×8 images; expert start θ₀ and end θ* near its init."""
    generator = torch.Generator().manual_seed(seed)
    student = build_student(ConvNetConfig(width=3, depth=2), (2, 8, 8), dim, seed=seed).to(dtype)
    layout = ParameterLayout.of(student)
    start = layout.flatten(student)
    target = start + 0.05 * torch.randn(start.shape, generator=generator, dtype=dtype)
    images = torch.randn(size, 2, 8, 8, generator=generator, dtype=dtype)
    targets = torch.randn(size, dim, generator=generator, dtype=dtype)
    return student, layout, start, target, images, targets, generator


def matching_gradients(
    unroll, steps, start, target, images, targets, lr, batches, learn_targets=True, snapshots="all", augmentations=None
):
    images = images.clone().requires_grad_(True)
    targets = targets.clone().requires_grad_(learn_targets)
    lr = lr.clone().requires_grad_(True)
    loss = match_trajectory(unroll, steps, start, target, images, targets, lr, batches, snapshots, augmentations)
    return loss, images.grad, targets.grad, lr.grad


@settings(deadline=None, max_examples=20)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(2, 10),
    batch=st.integers(1, 6),
    syn_steps=st.integers(1, 6),
    lr=st.floats(0.01, 1.0),
    learn_targets=st.booleans(),
    snapshots=st.one_of(st.sampled_from(SNAPSHOTS), st.integers(3, 7)),
)  # a budget of 3 unrolls 6 steps
def test_adjoint_gradients_equal_the_full_unroll(seed, size, batch, syn_steps, lr, learn_targets, snapshots):
    student, layout, start, target, images, targets, generator = random_problem(seed, size, 5, torch.float64)
    steps = KDSteps(student, layout, compile=False)
    # drawn with replacement: a batch may repeat an example, which must accumulate
    batches = [torch.randint(size, (batch,), generator=generator) for _ in range(syn_steps)]
    lr = torch.tensor(lr, dtype=torch.float64)
    full = matching_gradients("full", steps, start, target, images, targets, lr, batches, learn_targets)
    adjoint = matching_gradients(
        "adjoint", steps, start, target, images, targets, lr, batches, learn_targets, snapshots
    )
    torch.testing.assert_close(adjoint[0], full[0], rtol=1e-12, atol=0)
    for name, got, want in zip(("images", "representations", "lr"), adjoint[1:], full[1:]):
        if name == "representations" and not learn_targets:
            assert got is None and want is None
            continue
        assert want.abs().max() > 0, f"{name}: the full unroll gave a zero gradient"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item(), msg=name)


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 10_000),
    family=st.sampled_from(DSA_FAMILIES),
    target_loss=st.sampled_from(sorted(TARGET_LOSSES)),
    snapshots=st.sampled_from(("all", "sqrt", 2)),
)
def test_adjoint_gradients_equal_the_full_unroll_through_augmentation(seed, family, target_loss, snapshots):
    """Every inner step's minibatch differentiably augmented (DSA), under either target loss: the adjoint
    carries the gradient back through each step's augmentation as the full unroll's autograd does."""
    student, layout, start, target, images, targets, generator = random_problem(seed, 6, 5, torch.float64)
    steps = KDSteps(student, layout, compile=False, target_loss=target_loss)
    batches = [torch.randint(6, (4,), generator=generator) for _ in range(3)]
    config = DSAConfig(families=(family,))
    augmentations = [draw_dsa((4, 2, 8, 8), config, generator) for _ in batches]
    lr = torch.tensor(0.3, dtype=torch.float64)
    full = matching_gradients("full", steps, start, target, images, targets, lr, batches, augmentations=augmentations)
    adjoint = matching_gradients(
        "adjoint", steps, start, target, images, targets, lr, batches, snapshots=snapshots, augmentations=augmentations
    )
    plain = matching_gradients("full", steps, start, target, images, targets, lr, batches)
    torch.testing.assert_close(adjoint[0], full[0], rtol=1e-12, atol=0)
    for name, got, want in zip(("images", "representations", "lr"), adjoint[1:], full[1:]):
        assert want.abs().max() > 0, f"{name}: the full unroll gave a zero gradient"
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * want.abs().max().item(), msg=name)
    assert not torch.equal(full[1], plain[1]), "the augmentation did not change the images' gradient"


class RecordingSteps(KDSteps):
    """KDSteps that count inner SGD steps and the most of their results (snapshots) alive at once."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sgd_calls, self.most_alive, self.alive = 0, 0, weakref.WeakSet()

    def sgd_step(self, *args):
        result = super().sgd_step(*args)
        self.sgd_calls += 1
        self.alive.add(result)
        self.most_alive = max(self.most_alive, len(self.alive))
        return result


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 10_000),
    size=st.integers(2, 10),
    batch=st.integers(1, 6),
    syn_steps=st.integers(1, 12),
    budget=st.integers(5, 13),
)
@pytest.mark.slow
def test_checkpointed_adjoint_equals_the_plain_adjoint_bit_for_bit(seed, size, batch, syn_steps, budget):
    """syn_steps 1..12: one segment (N = 1), segments that divide N (4, 9) and a short last one (3, 5, 10);
    budgets 5..13 (5 unrolls up to 15 steps): below, at and above N."""
    student, layout, start, target, images, targets, generator = random_problem(seed, size, 5, torch.float32)
    batches = [torch.randint(size, (batch,), generator=generator) for _ in range(syn_steps)]
    lr = torch.tensor(0.3)
    runs = {}
    for snapshots in (*SNAPSHOTS, budget):
        steps = RecordingSteps(student, layout, False)
        runs[snapshots] = (
            matching_gradients("adjoint", steps, start, target, images, targets, lr, batches, snapshots=snapshots),
            steps,
        )
    for snapshots in ("sqrt", budget):
        for got, want in zip(runs[snapshots][0], runs["all"][0]):
            assert torch.equal(got, want)
    interval = math.isqrt(syn_steps - 1) + 1  # ⌈√N⌉
    segments = math.ceil(syn_steps / interval)
    last = syn_steps - (segments - 1) * interval  # kept from the forward sweep, not recomputed
    checkpointed, plain, budgeted = runs["sqrt"][1], runs["all"][1], runs[budget][1]
    assert plain.sgd_calls == syn_steps and plain.most_alive == syn_steps
    assert checkpointed.sgd_calls == syn_steps + (syn_steps - segments) - (last - 1)
    assert checkpointed.most_alive <= segments + interval - 1
    # θ_1..θ_N (θ_N alive to the end): at most the budget of θ_0..θ_{N-1}, for N − K recomputed steps
    assert budgeted.sgd_calls == syn_steps + max(syn_steps - budget, 0)
    assert budgeted.most_alive <= budget + 1 if budget < syn_steps else budgeted.most_alive == syn_steps


@pytest.mark.parametrize(
    "syn_steps, snapshots, lengths",
    [
        (1, "sqrt", [1]),
        (10, "sqrt", [4, 4, 2]),
        (9, "sqrt", [3, 3, 3]),
        (40, "sqrt", [7, 7, 7, 7, 7, 5]),
        (3, "all", [1, 1, 1]),
        (10, 16, [10]),
        (10, 10, [10]),
        (40, 16, [11, 15, 14]),
        (40, 10, [10, 9, 8, 7, 6]),
        (3, 2, [2, 1]),
    ],
)
def test_segment_lengths(syn_steps, snapshots, lengths):
    assert segment_lengths(syn_steps, snapshots) == lengths


@given(syn_steps=st.integers(1, 300), budget=st.integers(1, 40))
def test_a_snapshot_budget_holds_and_recomputes_n_minus_k_steps(syn_steps, budget):
    if budget * (budget + 1) // 2 < syn_steps:
        with pytest.raises(SslkdError, match=rf"^an adjoint snapshot budget of {budget} cannot unroll"):
            segment_lengths(syn_steps, budget)
        return
    lengths = segment_lengths(syn_steps, budget)
    assert sum(lengths) == syn_steps and min(lengths) >= 1
    # the backward sweep holds the earlier segments' first snapshots and the whole segment it is in
    assert all(index + length <= budget for index, length in enumerate(lengths))
    assert sum(length - 1 for length in lengths[:-1]) == max(syn_steps - budget, 0)  # recomputed steps


@pytest.mark.parametrize("snapshots", ["some", 0, -2, 2.5, True])
def test_unknown_snapshots_are_refused_in_one_line(snapshots):
    with pytest.raises(
        SslkdError,
        match=rf"^unknown adjoint snapshots {snapshots!r}; choose one of all, sqrt or a "
        r"number of snapshots >= 1$",
    ):
        segment_lengths(10, snapshots)


def test_adjoint_adds_to_existing_gradients_as_backward_does():
    student, layout, start, target, images, targets, _ = random_problem(0, 6, 4, torch.float64)
    steps = KDSteps(student, layout, compile=False)
    batches = [torch.arange(3), torch.arange(3, 6)]
    images = images.clone().requires_grad_(True)
    lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        match_trajectory("adjoint", steps, start, target, images, targets, lr, batches)
    once = matching_gradients("adjoint", steps, start, target, images.detach(), targets, lr.detach(), batches)
    torch.testing.assert_close(images.grad, 2 * once[1])
    torch.testing.assert_close(lr.grad, 2 * once[3])


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 1000), size=st.integers(3, 20), batch=st.integers(1, 8), epochs=st.integers(1, 3))
def test_kd_training_equals_torch_sgd_with_momentum_and_weight_decay(seed, size, batch, epochs):
    student, layout, start, _, images, targets, _ = random_problem(seed, size, 4, torch.float64)
    steps = KDSteps(student, layout, compile=False)
    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, batch_size=batch, epochs=epochs)
    trained = list(train_kd(steps, start, images, targets, generator=torch.Generator().manual_seed(seed), **hyper))

    optimiser = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for parameters, _, _ in trained:
        order = torch.randperm(size, generator=generator)
        for first in range(0, size, batch):
            optimiser.zero_grad()
            kd_mse_loss(student(images[order[first : first + batch]]), targets[order[first : first + batch]]).backward()
            optimiser.step()
        torch.testing.assert_close(parameters, layout.flatten(student), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_steps_agree_with_eager_and_fall_back_for_other_batch_sizes():
    """Compiles three tiny graphs (about a minute on 2 cores)."""
    student, layout, start, target, images, targets, generator = random_problem(1, 12, 5, torch.float32)
    eager, compiled = KDSteps(student, layout, compile=False), KDSteps(student, layout, compile=True)
    lr = torch.tensor(0.2)
    velocity = torch.randn(start.shape, generator=generator)
    cotangent = torch.randn(start.shape, generator=generator)
    for batch in (torch.arange(8), torch.arange(8, 12)):  # the second size runs the eager fallback
        for got, want in zip(
            compiled.train_step(start, velocity, images[batch], targets[batch], lr, 0.9, 1e-4),
            eager.train_step(start, velocity, images[batch], targets[batch], lr, 0.9, 1e-4),
        ):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            compiled.sgd_step(start, images[batch], targets[batch], lr),
            eager.sgd_step(start, images[batch], targets[batch], lr),
            rtol=1e-4,
            atol=1e-6,
        )
        for got, want in zip(
            compiled.gradient_of_gradient(start, images[batch], targets[batch], cotangent),
            eager.gradient_of_gradient(start, images[batch], targets[batch], cotangent),
        ):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    batches = [torch.arange(8), torch.arange(4, 12), torch.arange(2, 10)]
    full = matching_gradients("full", eager, start, target, images, targets, lr, batches)
    for snapshots in (*SNAPSHOTS, 2):
        adjoint = matching_gradients(
            "adjoint", compiled, start, target, images, targets, lr, batches, snapshots=snapshots
        )
        for got, want in zip(adjoint, full):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_bfloat16_training_step_is_mixed_precision_and_leaves_distillation_steps_in_float32():
    student, layout, start, _, images, targets, generator = random_problem(2, 16, 8, torch.float32)
    single, mixed = (
        KDSteps(student, layout, compile=False),
        KDSteps(student, layout, compile=False, precision="bfloat16"),
    )
    lr, velocity = torch.tensor(0.2), torch.randn(start.shape, generator=generator)
    batch = (start, velocity, images[:8], targets[:8], lr, 0.9, 1e-4)
    want, got, again = single.train_step(*batch), mixed.train_step(*batch), mixed.train_step(*batch)
    assert all(t.dtype == torch.float32 for t in got)
    for a, b in zip(got, again):
        assert torch.equal(a, b)  # deterministic
    step_want, step_got = want[0] - start, got[0] - start
    relative = ((step_got - step_want).norm() / step_want.norm()).item()
    assert 0 < relative < 0.05  # the forward ran in bfloat16: close to, not equal to, the float32 step
    assert abs(got[2].item() - want[2].item()) < 0.02 * abs(want[2].item())
    cotangent = torch.randn(start.shape, generator=generator)
    assert torch.equal(
        mixed.sgd_step(start, images[:8], targets[:8], lr), single.sgd_step(start, images[:8], targets[:8], lr)
    )
    for a, b in zip(
        mixed.gradient_of_gradient(start, images[:8], targets[:8], cotangent),
        single.gradient_of_gradient(start, images[:8], targets[:8], cotangent),
    ):
        assert torch.equal(a, b)


def test_unknown_precision_is_refused_in_one_line():
    student, layout, *_ = random_problem(0, 4, 2, torch.float32)
    with pytest.raises(SslkdError, match=r"^unknown precision 'float16'; choose one of float32, bfloat16$"):
        KDSteps(student, layout, compile=False, precision="float16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_instance_norm_equals_group_norm_with_a_group_per_channel(dtype):
    """instance_norm (the compiled gradient-of-gradient's) against ATen's group norm, under autocast too."""
    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(6, 6)
    with torch.no_grad():
        norm.weight.normal_(generator=generator), norm.bias.normal_(generator=generator)
    features = (3 * torch.randn(4, 6, 5, 5, generator=generator) + 2).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        want, got = norm(features), instance_norm(features, norm.weight, norm.bias, norm.eps)
    assert got.dtype == want.dtype == dtype
    tolerance = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got, want, **tolerance)


def test_writing_out_instance_norms_keeps_the_parameters_and_the_function():
    student, layout, start, _, images, _, _ = random_problem(3, 6, 5, torch.float64)
    written_out = write_out_instance_norms(student)
    assert ParameterLayout.of(written_out) == layout
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in written_out.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in student.modules()) == 2  # the original is untouched
    torch.testing.assert_close(written_out(images), student(images), rtol=1e-12, atol=1e-12)

"""The functional unroll, trajectory matching and its reproducibility."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from sslkd.data.augmentations import DSAConfig
from sslkd.errors import SslkdError
from sslkd.losses import kd_mse_loss
from sslkd.methods.distill import (
    DistillConfig,
    MinibatchSampler,
    distill,
    expert_order,
    sample_segment,
    validation_matching_loss,
    validation_start_epochs,
)
from sslkd.methods.kd_steps import KDSteps
from sslkd.methods.unroll import unroll_sgd

from conftest import make_tiny_problem


def config(**overrides) -> DistillConfig:
    values = dict(
        iterations=4,
        syn_steps=3,
        expert_epochs=1,
        max_start_epoch=2,
        batch_syn=4,
        lr_images=10.0,
        momentum_images=0.5,
        lr_representations=1.0,
        momentum_representations=0.5,
        lr_lr=1e-4,
        momentum_lr=0.5,
        lr_init=0.05,
        lr_min=1e-4,
        learn_representations=True,
        unroll="adjoint",
        adjoint_snapshots="all",
        compile=False,
        seeds=(0,),
    )
    return DistillConfig(**{**values, **overrides})


@settings(deadline=None, max_examples=15)
@given(st.integers(1, 5), st.floats(0.001, 0.2), st.integers(0, 1000))
def test_functional_unroll_equals_torch_sgd_steps(steps, lr, seed):
    student, layout, images, targets = make_tiny_problem()
    sampler = MinibatchSampler(len(images), 5, torch.Generator().manual_seed(seed))
    batches = [sampler.next() for _ in range(steps)]
    steps = KDSteps(student, layout, compile=False)
    optimiser = torch.optim.SGD(student.parameters(), lr=lr)
    # Step by step from the same θ_k: over several steps, a last-bit difference can cross a ReLU kink
    # and grow (hypothesis found such a case), which says nothing about the step itself.
    for batch in batches:
        unrolled = unroll_sgd(
            steps, layout.flatten(student), images, targets, torch.tensor(lr), [batch], create_graph=False
        )
        optimiser.zero_grad()
        kd_mse_loss(student(images[batch]), targets[batch]).backward()
        optimiser.step()
        torch.testing.assert_close(unrolled.detach(), layout.flatten(student), rtol=1e-5, atol=1e-6)


def test_unroll_is_differentiable_in_images_representations_and_lr(tiny_problem):
    student, layout, images, targets = tiny_problem
    images = images.clone().requires_grad_(True)
    targets = targets.clone().requires_grad_(True)
    lr = torch.tensor(0.1, requires_grad=True)
    batches = [torch.arange(4), torch.arange(4, 8)]
    end = unroll_sgd(KDSteps(student, layout, compile=False), layout.flatten(student), images, targets, lr, batches)
    end.pow(2).sum().backward()
    for tensor in (images, targets, lr):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0


def test_minibatches_cover_every_example_once_per_pass():
    sampler = MinibatchSampler(10, 4, torch.Generator().manual_seed(0))
    seen = torch.cat([sampler.next() for _ in range(5)])  # 20 indices = two passes
    assert sorted(seen[:8].tolist() + seen[8:10].tolist()) == list(range(10)) or len(set(seen.tolist())) == 10
    assert torch.bincount(seen, minlength=10).tolist() == [2] * 10


def test_expert_order_cycles_through_all_experts():
    order = expert_order(5, 12, torch.Generator().manual_seed(3))
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5))


def fake_trajectories(student, layout, images, targets, experts=3, epochs=3) -> torch.Tensor:
    """Real (tiny) expert trajectories: full-batch SGD epochs from different inits."""
    from sslkd.methods.experts import build_student
    from sslkd.models import ConvNetConfig

    trajectories = []
    for expert in range(experts):
        model = build_student(ConvNetConfig(width=4, depth=2), (3, 8, 8), 6, seed=10 + expert)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        snapshots = [layout.flatten(model)]
        for _ in range(epochs):
            optimiser.zero_grad()
            kd_mse_loss(model(images), targets).backward()
            optimiser.step()
            snapshots.append(layout.flatten(model))
        trajectories.append(torch.stack(snapshots))
    return torch.stack(trajectories)


@pytest.mark.parametrize("unroll", ["adjoint", "full"])
def test_distillation_is_bit_identical_for_the_same_seed_and_differs_for_another(tiny_problem, unroll):
    student, layout, images, targets = tiny_problem
    trajectories = fake_trajectories(student, layout, images, targets)
    runs = [
        distill(
            student,
            layout,
            trajectories,
            images[:6],
            targets[:6],
            config(unroll=unroll),
            torch.Generator().manual_seed(s),
        )
        for s in (7, 7, 8)
    ]
    assert torch.equal(runs[0].images, runs[1].images)
    assert torch.equal(runs[0].representations, runs[1].representations)
    assert runs[0].lr == runs[1].lr and runs[0].matching_losses == runs[1].matching_losses
    assert not torch.equal(runs[0].images, runs[2].images)
    assert not torch.equal(runs[0].images, images[:6])  # the images were learned


def test_learned_lr_is_projected_onto_the_positive_floor(tiny_problem):
    """An expert that moved *up* the synthetic loss makes the matching gradient push α below zero;
    the projection must hold it at lr_min."""
    student, layout, images, targets = tiny_problem
    start = layout.flatten(student).requires_grad_(True)
    from torch.func import functional_call

    loss = kd_mse_loss(functional_call(student, layout.unflatten(start), (images[:6],)), targets[:6])
    (ascent,) = torch.autograd.grad(loss, start)
    trajectories = torch.stack([start.detach(), start.detach() + 0.01 * ascent / ascent.norm()]).unsqueeze(0)
    result = distill(
        student,
        layout,
        trajectories,
        images[:6],
        targets[:6],
        config(lr_lr=10.0, lr_images=0.0, iterations=5, max_start_epoch=1, expert_epochs=1),
        torch.Generator().manual_seed(0),
    )
    assert min(result.learning_rates) == pytest.approx(1e-4)
    assert all(lr >= torch.tensor(1e-4).item() for lr in result.learning_rates)  # float32 floor


def test_frozen_representations_are_not_learned(tiny_problem):
    student, layout, images, targets = tiny_problem
    trajectories = fake_trajectories(student, layout, images, targets)
    result = distill(
        student,
        layout,
        trajectories,
        images[:6],
        targets[:6],
        config(learn_representations=False),
        torch.Generator().manual_seed(0),
    )
    assert torch.equal(result.representations, targets[:6])


def test_too_short_trajectories_are_refused(tiny_problem):
    student, layout, images, targets = tiny_problem
    trajectories = fake_trajectories(student, layout, images, targets, epochs=2)
    with pytest.raises(SslkdError, match="train experts longer"):
        distill(
            student,
            layout,
            trajectories,
            images[:6],
            targets[:6],
            config(max_start_epoch=2, expert_epochs=2),
            torch.Generator().manual_seed(0),
        )


def test_checkpointed_snapshots_give_the_same_distillation(tiny_problem):
    student, layout, images, targets = tiny_problem
    trajectories = fake_trajectories(student, layout, images, targets)
    runs = [
        distill(
            student,
            layout,
            trajectories,
            images[:6],
            targets[:6],
            config(syn_steps=5, adjoint_snapshots=snapshots),
            torch.Generator().manual_seed(7),
        )
        for snapshots in ("all", "sqrt", 3)
    ]
    for run in runs[1:]:
        assert torch.equal(runs[0].images, run.images)
        assert torch.equal(runs[0].representations, run.representations)
        assert runs[0].lr == run.lr and runs[0].matching_losses == run.matching_losses


def test_held_out_experts_are_never_matched_and_report_the_set_s_matching_loss(tiny_problem):
    """Holding the last expert out gives the set that matching only the others gives (the held-out
    trajectory is never read by the updates), and records the validation loss on both groups of experts."""
    student, layout, images, targets = tiny_problem
    trajectories = fake_trajectories(student, layout, images, targets)
    held_out = distill(
        student,
        layout,
        trajectories,
        images[:6],
        targets[:6],
        config(held_out_experts=1),
        torch.Generator().manual_seed(3),
    )
    others = distill(
        student, layout, trajectories[:2], images[:6], targets[:6], config(), torch.Generator().manual_seed(3)
    )
    assert torch.equal(held_out.images, others.images) and held_out.lr == others.lr
    assert others.validation == {}
    assert [i for i, _ in held_out.validation["trained"]] == [0, 4]
    assert [i for i, _ in held_out.validation["held_out"]] == [
        0,
        1,
        2,
        3,
        4,
    ]  # every tenth (here every one) and the end
    steps = KDSteps(student, layout, compile=False)
    lr = torch.tensor(held_out.lr)
    final = validation_matching_loss(steps, trajectories[2:], held_out.images, held_out.representations, lr, config())
    assert held_out.validation["held_out"][-1][1] == pytest.approx(final, rel=1e-6)
    start = held_out.validation["held_out"][0][1]
    assert start == pytest.approx(
        validation_matching_loss(steps, trajectories[2:], images[:6], targets[:6], torch.tensor(0.05), config())
    )
    with pytest.raises(SslkdError, match="held_out_experts = 3 leaves none of the 3 experts"):
        distill(student, layout, trajectories, images[:6], targets[:6], config(held_out_experts=3), torch.Generator())


def test_start_epochs_are_drawn_between_min_and_max_start_epoch():
    trajectory = torch.arange(10.0).view(10, 1).expand(10, 3)  # snapshot e holds the value e
    generator = torch.Generator().manual_seed(0)
    starts = {
        int(sample_segment(trajectory, config(min_start_epoch=3, max_start_epoch=6), generator)[0][0])
        for _ in range(200)
    }
    assert starts == {3, 4, 5}
    start, target = sample_segment(trajectory, config(min_start_epoch=3, max_start_epoch=6, expert_epochs=2), generator)
    assert target[0] == start[0] + 2
    assert validation_start_epochs(config(min_start_epoch=10, max_start_epoch=50)) == [10, 20, 30, 39, 49]
    assert validation_start_epochs(config(max_start_epoch=2)) == [0, 1]


def test_augmented_distillation_is_reproducible_and_differs_from_plain(tiny_problem):
    student, layout, images, targets = tiny_problem
    trajectories = fake_trajectories(student, layout, images, targets)
    runs = [
        distill(student, layout, trajectories, images[:6], targets[:6], cfg, torch.Generator().manual_seed(5))
        for cfg in (config(augment=DSAConfig()), config(augment=DSAConfig()), config())
    ]
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].matching_losses == runs[1].matching_losses
    assert not torch.equal(runs[0].images, runs[2].images)


@pytest.mark.parametrize(
    "field, value",
    [
        ("held_out_experts", -1),
        ("min_start_epoch", 2),  # = max_start_epoch: no start epoch left
        ("min_start_epoch", -1),
        ("unroll", "tesla"),
        ("lr_min", 0.0),
        ("iterations", 0),
        ("seeds", ()),
        ("adjoint_snapshots", "checkpointed"),
        ("adjoint_snapshots", 0),
        ("adjoint_snapshots", 1),
    ],
)  # a budget of 1 unrolls 1 step, not 3
def test_invalid_distill_config_is_refused(field, value):
    with pytest.raises(SslkdError):
        config(**{field: value})

"""Checkpoint/resume: a run stopped at any safe point and resumed from its saved state (through a file)
ends bit-identical to an uninterrupted run; run keys and the checkpoint store."""

from __future__ import annotations

import pytest
import torch
from test_distill import config as distill_config

from sslkd.data.augmentations import AugmentConfig, DSAConfig
from sslkd.errors import SslkdError
from sslkd.methods.distill import distill
from sslkd.methods.experts import ExpertsConfig, build_student, train_expert
from sslkd.methods.teacher import SSLConfig, projector, train_ssl
from sslkd.models import ConvNetConfig, ResNet18, ResNetConfig, seeded_module
from sslkd.store.checkpoints import NO_CHECKPOINTS, CheckpointPolicy, RunCheckpoints, run_key

from conftest import make_tiny_problem


class Stop(Exception):
    """Stands for the job being killed right after a checkpoint."""


def stop_after(store: RunCheckpoints, name: str, count: int):
    """An on_checkpoint hook that saves every state and 'kills' the run after ``count`` of them."""
    calls = []

    def hook(state):
        store.save(name, state)
        calls.append(1)
        if len(calls) == count:
            raise Stop

    return hook


def assert_identical(first, second):
    if isinstance(first, torch.Tensor):
        assert torch.equal(first, second)
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for a, b in zip(first, second):
            assert_identical(a, b)
    else:
        assert first == second


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [1, 3])
def test_distill_resumes_bit_identically(tmp_path, stop_at):
    student, layout, images, targets = make_tiny_problem()
    trajectories = torch.stack(
        [torch.stack([layout.flatten(student) * (1 + 0.1 * k + 0.01 * s) for s in range(4)]) for k in range(3)]
    )
    # with a held-out expert (its validation history is part of the state) and augmented inner steps (their
    # draws come from the run's generator)
    cfg = distill_config(iterations=5, held_out_experts=1, augment=DSAConfig())
    run = lambda **hooks: distill(
        student, layout, trajectories, images, targets, cfg, torch.Generator().manual_seed(7), **hooks
    )
    reference = run()
    store = RunCheckpoints(tmp_path)
    with pytest.raises(Stop):
        run(on_checkpoint=stop_after(store, "seed0", stop_at))
    resumed = run(resume=store.load("seed0"))
    assert_identical(reference.images, resumed.images)
    assert_identical(reference.representations, resumed.representations)
    assert reference.lr == resumed.lr
    assert_identical(reference.matching_losses, resumed.matching_losses)
    assert_identical(reference.learning_rates, resumed.learning_rates)
    assert reference.validation == resumed.validation and len(reference.validation["held_out"]) == 6


def test_expert_training_resumes_bit_identically(tmp_path):
    _, _, images, targets = make_tiny_problem()
    cfg = ExpertsConfig(
        student=ConvNetConfig(width=4, depth=2),
        objective="kd",
        num_experts=1,
        epochs=4,
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        batch_size=5,
        ssl=None,
        compile=False,
        precision="float32",
        seed=0,
    )
    run = lambda **hooks: train_expert(
        build_student(cfg.student, (3, 8, 8), 6, seed=3),
        images,
        targets,
        cfg,
        torch.Generator().manual_seed(11),
        **hooks,
    )
    reference = run()
    store = RunCheckpoints(tmp_path)
    with pytest.raises(Stop):
        run(on_checkpoint=stop_after(store, "expert", 2))
    resumed = run(resume=store.load("expert"))
    assert_identical(reference, resumed)


@pytest.mark.slow
def test_teacher_training_resumes_bit_identically(tmp_path):
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    augment = AugmentConfig(
        crop_scale=(0.4, 1.0),
        flip=True,
        jitter_prob=0.8,
        brightness=0.4,
        contrast=0.4,
        saturation=0.0,
        grayscale_prob=0.0,
        solarize_prob=0.2,
    )
    cfg = SSLConfig(
        objective="barlow_twins",
        projector_dim=8,
        epochs=3,
        batch_size=4,
        lr=1e-2,
        weight_decay=1e-4,
        off_diagonal_weight=5e-3,
        temperature=0.5,
        augment=augment,
    )

    def run(**hooks):
        encoder = seeded_module(lambda: ResNet18(ResNetConfig(width=2), 1), 0)
        head = seeded_module(lambda: projector(encoder.representation_dim, 8), 1)
        losses = train_ssl(encoder, head, images, lambda x: x - 0.5, cfg, torch.Generator().manual_seed(2), **hooks)
        return losses, list(encoder.state_dict().values())

    reference = run()
    store = RunCheckpoints(tmp_path)
    with pytest.raises(Stop):
        run(on_checkpoint=stop_after(store, "training", 1))
    resumed = run(resume=store.load("training"))
    assert_identical(reference, resumed)  # includes BatchNorm running statistics


def test_the_saver_throttles_and_writes_atomically(tmp_path):
    store = RunCheckpoints(tmp_path, interval_s=3600)
    save = store.saver("state")
    save({"x": torch.ones(2)})
    assert store.load("state") is None  # not due yet
    store.interval_s = 0
    save({"x": torch.ones(2)})
    assert torch.equal(store.load("state")["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temporary files left
    store.clear()
    assert not tmp_path.exists()


def test_no_checkpoints_reads_and_writes_nothing(tmp_path):
    assert NO_CHECKPOINTS.saver("x") is None and NO_CHECKPOINTS.load("x") is None
    NO_CHECKPOINTS.save("x", {})
    NO_CHECKPOINTS.clear()


def test_a_corrupt_checkpoint_is_one_clear_error(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(SslkdError, match="cannot read checkpoint .*state.pt"):
        RunCheckpoints(tmp_path).load("state")


def test_the_run_key_follows_config_and_inputs(tmp_path):
    data = tmp_path / "data.pt"
    data.write_bytes(b"one")
    key = run_key("experts", ConvNetConfig(width=4, depth=2), [data])
    assert run_key("experts", ConvNetConfig(width=4, depth=2), [data]) == key
    assert run_key("experts", ConvNetConfig(width=8, depth=2), [data]) != key
    assert run_key("distill", ConvNetConfig(width=4, depth=2), [data]) != key
    data.write_bytes(b"two")
    assert run_key("experts", ConvNetConfig(width=4, depth=2), [data]) != key
    policy = CheckpointPolicy(tmp_path / "state", 0.0)
    assert policy.run("experts", ConvNetConfig(width=4, depth=2), [data]).folder.parent == tmp_path / "state"
    with pytest.raises(SslkdError, match="missing input"):
        run_key("experts", ConvNetConfig(width=4, depth=2), [tmp_path / "absent.pt"])

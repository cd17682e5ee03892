"""The linear probe must not collapse to chance on a random encoder, and must rank a trained one higher."""

from __future__ import annotations

import pytest
import torch

from sslkd.data.datasets import Normalisation, class_balanced_split, load_digits_images
from sslkd.errors import SslkdError
from sslkd.evaluation.probe import (
    PretrainConfig,
    ProbeConfig,
    labelled_subset,
    linear_probe_accuracy,
    pretrain_kd,
    probe_gain,
    trunk_features,
)
from sslkd.methods.experts import build_student
from sslkd.models import ConvNetConfig


@pytest.fixture(scope="module")
def digits_split():
    images, labels, _ = load_digits_images()
    normalisation = Normalisation.of(images)
    train, test = class_balanced_split(labels, 0.3, torch.Generator().manual_seed(0))
    x = normalisation.from_uint8(images)
    return x[train], labels[train], x[test], labels[test]


def probe(encoder, digits_split, fraction=0.05, seed=0) -> float:
    train_x, train_y, test_x, test_y = digits_split
    subset = labelled_subset(train_y, fraction, torch.Generator().manual_seed(seed))
    return linear_probe_accuracy(
        trunk_features(encoder, train_x[subset]),
        train_y[subset],
        trunk_features(encoder, test_x),
        test_y,
        ProbeConfig((fraction,), 1.0, 1000),
    )


@pytest.mark.slow
def test_random_encoder_is_clearly_above_chance_and_a_trained_one_above_that(digits_split):
    train_x, train_y, _, _ = digits_split
    random_encoder = build_student(ConvNetConfig(width=16, depth=3), (1, 8, 8), 10, seed=0)
    random_accuracy = probe(random_encoder, digits_split)

    trained = build_student(ConvNetConfig(width=16, depth=3), (1, 8, 8), 10, seed=0)
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(15):  # supervised training on the training split: a genuinely better encoder
        for batch in torch.randperm(len(train_x), generator=generator).split(64):
            optimiser.zero_grad()
            torch.nn.functional.cross_entropy(trained(train_x[batch]), train_y[batch]).backward()
            optimiser.step()
    trained_accuracy = probe(trained, digits_split)
    assert random_accuracy > 10.0 + 25.0, f"random encoder probe {random_accuracy:.1f}% is near chance (10%)"
    assert trained_accuracy > random_accuracy + 3.0, f"trained {trained_accuracy:.1f}% vs random {random_accuracy:.1f}%"


def test_labelled_subset_is_stratified_seeded_and_shared():
    labels = torch.arange(10).repeat_interleave(50)
    first = labelled_subset(labels, 0.1, torch.Generator().manual_seed(4))
    assert torch.bincount(labels[first]).tolist() == [5] * 10
    assert torch.equal(first, labelled_subset(labels, 0.1, torch.Generator().manual_seed(4)))
    assert torch.bincount(labels[labelled_subset(labels, 0.001, torch.Generator())]).tolist() == [1] * 10


def _pretrain_config(epochs: int, min_steps: int) -> PretrainConfig:
    return PretrainConfig(
        epochs=epochs,
        batch_size=4,
        lr=0.05,
        momentum=0.9,
        weight_decay=1e-4,
        compile=False,
        precision="float32",
        min_steps=min_steps,
    )


def test_min_steps_raises_the_epochs_of_small_sets_only():
    config = _pretrain_config(epochs=2, min_steps=12)
    assert config.epochs_for(4) == 12  # one batch an epoch: 12 epochs give 12 steps
    assert config.epochs_for(10) == 4  # three batches an epoch (4 + 4 + 2)
    assert config.epochs_for(400) == 2  # 100 batches an epoch: the configured epochs already exceed it
    assert _pretrain_config(epochs=2, min_steps=0).epochs_for(4) == 2
    assert _pretrain_config(epochs=0, min_steps=12).epochs_for(4) == 0  # no pre-training stays none
    with pytest.raises(SslkdError, match="min_steps"):
        _pretrain_config(epochs=2, min_steps=-1)


def test_pretraining_runs_the_raised_number_of_epochs():
    student = build_student(ConvNetConfig(width=4, depth=1), (1, 8, 8), 3, seed=0)
    images, targets = torch.randn(6, 1, 8, 8), torch.randn(6, 3)
    losses = pretrain_kd(
        student, images, targets, 0.05, _pretrain_config(epochs=1, min_steps=5), torch.Generator().manual_seed(0)
    )
    assert len(losses) == 3  # two batches an epoch, at least five steps


def test_horizons_give_small_sets_the_paper_epochs_or_the_equal_steps():
    config = _pretrain_config(epochs=2, min_steps=12)
    assert config.at_horizon("equal_steps").epochs_for(4) == 12
    assert config.at_horizon("paper").epochs_for(4) == 2  # the paper's passes whatever the set size
    assert config.at_horizon("paper").epochs_for(400) == config.at_horizon("equal_steps").epochs_for(400) == 2
    assert config.epochs_for(0) == 0  # no pre-training set: nothing to run at either horizon
    with pytest.raises(SslkdError, match="horizon"):
        config.at_horizon("forever")


def test_probe_gain_pairs_each_label_draw_with_the_untrained_one():
    trained = [{"0.1": 50.0, "0.5": 70.0}, {"0.1": 54.0, "0.5": 71.0}]
    untrained = [{"0.1": 40.0, "0.5": 60.0}, {"0.1": 41.0, "0.5": 64.0}]
    result = probe_gain(trained, untrained)
    assert result["trained"]["0.1"] == {"mean": 52.0, "std": pytest.approx(8**0.5), "n": 2}
    assert result["untrained"]["0.5"] == {"mean": 62.0, "std": pytest.approx(8**0.5), "n": 2}
    # gains 10 and 13 (0.1), 10 and 7 (0.5): paired draw by draw, not difference of means alone
    assert result["gain"]["0.1"] == {"mean": 11.5, "std": pytest.approx(4.5**0.5), "n": 2}
    assert result["gain"]["0.5"] == {"mean": 8.5, "std": pytest.approx(4.5**0.5), "n": 2}
    with pytest.raises(ValueError):
        probe_gain(trained, untrained[:1])  # every draw needs its untrained partner

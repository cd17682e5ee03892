"""High-loss and random initial subsets."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from sslkd.errors import SslkdError
from sslkd.methods.selection import (
    class_balanced_high_loss_indices,
    high_loss_indices,
    mean_expert_kd_loss,
    random_indices,
)


@given(st.lists(st.integers(0, 5), min_size=2, max_size=60), st.data())
def test_high_loss_selection_is_monotone_in_size_and_in_dataset_order(values, data):
    losses = torch.tensor(values, dtype=torch.float32)  # many ties on purpose
    small = data.draw(st.integers(1, len(values)))
    large = data.draw(st.integers(small, len(values)))
    small_set, large_set = high_loss_indices(losses, small), high_loss_indices(losses, large)
    assert set(small_set.tolist()) <= set(large_set.tolist())
    assert small_set.tolist() == sorted(small_set.tolist())
    outside = [losses[i] for i in range(len(values)) if i not in set(small_set.tolist())]
    assert not outside or min(losses[small_set]) >= max(outside)


def test_high_loss_indices_refer_to_dataset_positions():
    losses = torch.tensor([0.1, 5.0, 0.2, 9.0, 0.3])
    assert high_loss_indices(losses, 2).tolist() == [1, 3]


def test_mean_expert_loss_follows_the_dataset_order(tiny_problem):
    student, layout, images, targets = tiny_problem
    experts = torch.stack([layout.flatten(student), layout.flatten(student) * 0.5])
    losses = mean_expert_kd_loss(student, layout, experts, images, targets, batch_size=5)
    permutation = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    permuted = mean_expert_kd_loss(student, layout, experts, images[permutation], targets[permutation], batch_size=5)
    torch.testing.assert_close(permuted, losses[permutation])


def test_random_indices_are_distinct_sorted_and_seeded():
    first = random_indices(100, 10, torch.Generator().manual_seed(0))
    assert len(set(first.tolist())) == 10 and first.tolist() == sorted(first.tolist())
    assert torch.equal(first, random_indices(100, 10, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("size", [0, 11])
def test_subset_size_must_fit(size):
    with pytest.raises(SslkdError, match="must lie in"):
        high_loss_indices(torch.rand(10), size)


def test_class_balanced_high_loss_takes_each_class_top_share_in_dataset_order():
    losses = torch.tensor([9.0, 1.0, 8.0, 2.0, 3.0, 7.0, 0.5, 6.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # global top 4 would be class 0's 9, 8 and class 1's 7, 6; per class: two of each
    assert class_balanced_high_loss_indices(losses, labels, 4).tolist() == [0, 2, 5, 7]
    # odd size: the extra one goes to the first class
    assert class_balanced_high_loss_indices(losses, labels, 3).tolist() == [0, 2, 5]


def test_class_balanced_high_loss_tops_up_small_classes_to_the_exact_size():
    losses = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 10.0])
    labels = torch.tensor([0, 0, 0, 0, 0, 1])
    picked = class_balanced_high_loss_indices(losses, labels, 4)
    assert picked.tolist() == [0, 1, 2, 5]
    assert len(set(picked.tolist())) == 4


def test_class_balanced_high_loss_refuses_mismatched_labels():
    with pytest.raises(SslkdError, match="same shape"):
        class_balanced_high_loss_indices(torch.rand(5), torch.zeros(4, dtype=torch.long), 2)

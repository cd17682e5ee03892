"""The named seed streams keep the numbers the artifacts were made with (renaming must not reseed)."""

from __future__ import annotations

import torch

from sslkd.seeding import EvaluateStream, ExpertStream, TeacherStream, VarianceStream, derive_seed, generator


def test_the_streams_keep_their_numbers():
    assert [int(s) for s in TeacherStream] == [0, 1, 2, 3]
    assert [int(s) for s in ExpertStream] == [1]
    assert [int(s) for s in EvaluateStream] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [int(s) for s in VarianceStream] == [0, 1, 2, 3, 4, 5, 6]


def test_a_named_stream_seeds_as_its_number_and_streams_differ():
    assert derive_seed(7, EvaluateStream.LABELLED_SUBSET, 1) == derive_seed(7, 2, 1)
    assert torch.equal(
        torch.rand(4, generator=generator(3, TeacherStream.TRAINING)), torch.rand(4, generator=generator(3, 2))
    )
    assert len({derive_seed(0, stream) for stream in VarianceStream}) == len(VarianceStream)

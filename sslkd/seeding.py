"""Explicit randomness: every random stream is a ``torch.Generator`` derived from config seeds."""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed determined by the integer keys (e.g. stage seed, expert index), independent streams
    for different keys (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


# The named streams: the key after a stage's seed (and, where one is, the index of a run) that tells its
# random streams apart. The numbers are those the artifacts were made with: changing one changes results.
# Streams with no key of their own: data's split (``torch.Generator().manual_seed(split_seed)``), init's
# random subset (``generator(init.seed)``), distillation (``generator(distill seed)``) and each expert's
# initialisation (``derive_seed(experts.seed, expert index)``).


class TeacherStream(IntEnum):
    """``derive_seed(teacher.seed, stream)``."""

    ENCODER_INIT = 0
    PROJECTOR_INIT = 1
    TRAINING = 2  # augmentations and batches of SSL training
    PROBE_LABELS = 3  # with the label draw and the fraction's index: the teacher probe's labelled subsets


class ExpertStream(IntEnum):
    """``generator(experts.seed, expert index, stream)``."""

    TRAINING = 1  # augmentations and batches of the expert's training


class KrrStStream(IntEnum):
    """``generator(krr_st seed, stream)``."""

    TRAINING = 0  # real batches and their augmentations
    POOL = 1  # the model pool: initialisations, draws and initial step counters


class MttSslStream(IntEnum):
    """``generator(mtt_ssl's distill seed, stream)``; its experts: ``generator(experts.seed, expert index,
    ExpertStream.TRAINING)`` as the KD experts (another objective, so other trajectories)."""

    MATCHING = 0


class EvaluateStream(IntEnum):
    """``derive_seed(eval seed, stream[, index])``."""

    ENCODER_INIT = 0
    PRETRAINING = 1  # batches of KD pre-training
    LABELLED_SUBSET = 2  # with the label fraction's index: the probe's labelled subset
    RANDOM_SUBSET = 3  # the random baseline's pre-training subset
    FINE_TUNING = 4  # with the label fraction's index: batches and augmentations of fine-tuning
    # Transfer (sslkd transfer), with the downstream set's key (transfer.downstream_key) and the fraction's index
    TRANSFER_LABELLED_SUBSET = 5
    TRANSFER_FINE_TUNING = 6
    SSL_PRETRAINING = 7  # batches and augmentations of SSL pre-training (MTT-SSL's set)


class VarianceStream(IntEnum):
    """``derive_seed(variance.seed, stream[, run or expert index])``."""

    STUDENT_INIT = 0  # the student every gradient, dispersion run and matching starts from
    GRADIENT_BATCHES = 1
    DISPERSION_RUN = 2  # with the run's index
    MATCHING_EXPERT_INIT = 3  # with the expert's index
    START_SUBSET = 4  # the images matching starts from
    MATCHING_EXPERT_TRAINING = 5  # with the expert's index
    MATCHING = 6

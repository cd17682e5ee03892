"""The losses of MKDT as small pure functions with documented shapes.

- :func:`kd_mse_loss`: knowledge distillation, student output regresses teacher representations;
- :func:`soft_cross_entropy`: supervised targets (the known answer of trajectory matching);
- :func:`barlow_twins_loss` and :func:`simclr_loss`: the SSL objectives (teacher training, SSL experts);
- :func:`trajectory_matching_loss`: the normalised parameter-matching loss of trajectory matching.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_mse_loss(student_out: torch.Tensor, teacher_rep: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries.

    student_out, teacher_rep: [B, D]. Returns a scalar: mean over B and D.
    """
    if student_out.shape != teacher_rep.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_out.shape)} vs teacher {tuple(teacher_rep.shape)}")
    return F.mse_loss(student_out, teacher_rep)


def soft_cross_entropy(logits: torch.Tensor, target_probabilities: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits against target distributions (one-hot rows: the usual cross-entropy).

    logits, target_probabilities: [B, C]. Returns a scalar: mean over B of −Σ_c p_c log softmax(z)_c. Linear in
    the targets, so learned targets need not stay on the simplex.
    """
    if logits.shape != target_probabilities.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)} vs targets {tuple(target_probabilities.shape)}")
    return -(target_probabilities * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


# The regression losses a student can be trained with: the teacher's representations (or one-hot labels)
# under MSE (MKDT's KD loss), or target distributions under cross-entropy (supervised trajectory matching).
TARGET_LOSSES = {"mse": kd_mse_loss, "cross_entropy": soft_cross_entropy}


def per_example_kd_loss(student_out: torch.Tensor, teacher_rep: torch.Tensor) -> torch.Tensor:
    """KD loss of each example, mean over the D dims. student_out, teacher_rep: [B, D] -> [B]."""
    if student_out.shape != teacher_rep.shape:
        raise ValueError(f"shape mismatch: student {tuple(student_out.shape)} vs teacher {tuple(teacher_rep.shape)}")
    return (student_out - teacher_rep).pow(2).mean(dim=1)


def _standardise_batch(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-dimension standardisation over the batch (biased variance, as BatchNorm1d(affine=False))."""
    centred = z - z.mean(dim=0, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(dim=0, keepdim=True) + eps)


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, off_diagonal_weight: float = 5e-3, eps: float = 1e-5
) -> torch.Tensor:
    """Barlow Twins redundancy-reduction loss (Zbontar et al. 2021).

    z1, z2: [B, P] projections of two augmented views of the same B images. The cross-correlation
    C = z1nᵀ z2n / B of the batch-standardised views is pulled to the identity:
    sum_i (1 - C_ii)² + off_diagonal_weight · sum_{i≠j} C_ij². Returns a scalar.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two [B, P] views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    cross = _standardise_batch(z1, eps).T @ _standardise_batch(z2, eps) / batch
    on_diagonal = (1.0 - torch.diagonal(cross)).pow(2).sum()
    off_diagonal = cross.pow(2).sum() - torch.diagonal(cross).pow(2).sum()
    return on_diagonal + off_diagonal_weight * off_diagonal


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR NT-Xent loss (Chen et al. 2020). z1, z2: [B, P] projections of two views. Returns a scalar."""
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two [B, P] views of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(batch, 2 * batch), torch.arange(batch)]).to(z.device)
    return F.cross_entropy(logits, positives)


def trajectory_matching_loss(
    student_end: torch.Tensor, expert_start: torch.Tensor, expert_end: torch.Tensor
) -> torch.Tensor:
    """Normalised matching loss ‖θ_N − θ*‖² / ‖θ₀ − θ*‖² (Cazenavette et al. 2022).

    student_end: [P] parameters after the unrolled steps; expert_start θ₀, expert_end θ*: [P].
    Equals 1 when no step is taken (θ_N = θ₀).
    """
    if not student_end.shape == expert_start.shape == expert_end.shape:
        raise ValueError("student and expert parameter vectors must have the same shape")
    return (student_end - expert_end).pow(2).sum() / (expert_start - expert_end).pow(2).sum()

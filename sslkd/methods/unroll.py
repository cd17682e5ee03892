"""Gradients of the trajectory-matching loss L = ‖θ_N − θ*‖² / ‖θ₀ − θ*‖² through N inner SGD steps
θ_{k+1} = θ_k − α g_k, g_k = ∇_θ ℓ(θ_k; X_b, Y_b), w.r.t. the synthetic images X, representations Y and α.

* ``full`` (the reference): autograd keeps the graph of all N steps; memory grows with N × batch.
* ``adjoint`` (exact, constant memory): the N steps run without a graph, keeping only θ_0..θ_{N-1}
  [N, P]; then, from λ_N = ∂L/∂θ_N, for k = N−1..0 one gradient-of-gradient at θ_k gives
  ∂L/∂α += −⟨λ_{k+1}, g_k⟩, ∂L/∂(X_b, Y_b) += −α ∂⟨λ_{k+1}, g_k⟩/∂(X_b, Y_b) and
  λ_k = λ_{k+1} − α H_k λ_{k+1} (H_k λ = ∂⟨λ, g_k⟩/∂θ_k). This is the chain rule of the full unroll
  reordered, so the gradients are the same (tests/test_unroll.py); TESLA's published variant drops the
  cross-step terms H_k and is not exact.

  ``snapshots`` says which θ_k the forward sweep keeps: ``all`` keeps the N snapshots; ``sqrt`` keeps
  every s-th (s = ⌈√N⌉, the checkpoints) and those of the last checkpoint segment, and the backward
  sweep recomputes the other segments θ_{js}..θ_{js+s−1} one at a time from their checkpoints with the
  same minibatches and α, so at most ⌈N/s⌉ + s − 1 ≈ 2√N snapshots are alive, for fewer than N extra
  inner SGD steps (N − ⌈N/s⌉ − the last segment's length + 1). A number K is a budget: at most K
  snapshots alive for any N, and N − K recomputed steps (the fewest possible: the backward sweep starts
  with at most K of the N), from segments that grow towards the start by the checkpoints already freed
  (:func:`segment_lengths`). The recomputation runs the same step on the same tensors as the forward
  sweep, so the snapshots, and the gradients, are bit-identical.

Both accumulate into ``.grad`` of the tensors that require it, as ``loss.backward()`` would, and return
the loss, so the outer optimisers do not care which unroll ran.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import torch

from sslkd.errors import SslkdError
from sslkd.losses import trajectory_matching_loss
from sslkd.methods.kd_steps import KDSteps

UNROLLS = ("full", "adjoint")
SNAPSHOTS = ("all", "sqrt")  # which θ_k the adjoint's forward sweep keeps (module doc)


Augmentation = Callable[[torch.Tensor], torch.Tensor]  # one inner step's drawn augmentation of its minibatch


def step_images(images: torch.Tensor, batch: torch.Tensor, augmentation: Augmentation | None) -> torch.Tensor:
    """The minibatch X_b [B, C, H, W] an inner step trains on: images[batch], augmented if the step has one."""
    return images[batch] if augmentation is None else augmentation(images[batch])


def _augmentations(
    batches: list[torch.Tensor], augmentations: Sequence[Augmentation] | None
) -> list[Augmentation | None]:
    if augmentations is None:
        return [None] * len(batches)
    if len(augmentations) != len(batches):
        raise ValueError(f"{len(augmentations)} augmentations for {len(batches)} inner steps")
    return list(augmentations)


def unroll_sgd(
    steps: KDSteps,
    start: torch.Tensor,
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    batches: list[torch.Tensor],
    create_graph: bool = True,
    augmentations: Sequence[Augmentation] | None = None,
) -> torch.Tensor:
    """Plain SGD θ_{k+1} = θ_k − α ∇ MSE(f(a_k(X_b); θ_k), Y_b) over the given minibatches, functionally.

    start: θ₀ [P]; images X [M, C, H, W]; representations Y [M, D]; lr α: scalar tensor;
    batches: one index tensor per step; augmentations: one differentiable a_k per step (None: identity).
    With create_graph the result is differentiable w.r.t. X, Y, α (the full unroll); returns θ_N [P].
    """
    parameters = start if start.requires_grad else start.detach().requires_grad_(True)
    for batch, augmentation in zip(batches, _augmentations(batches, augmentations), strict=True):
        loss = steps.loss(parameters, step_images(images, batch, augmentation), representations[batch])
        (gradient,) = torch.autograd.grad(loss, parameters, create_graph=create_graph)
        parameters = parameters - lr * gradient
        if not create_graph:
            parameters = parameters.detach().requires_grad_(True)
    return parameters


def _accumulate(tensor: torch.Tensor, gradient: torch.Tensor) -> None:
    if tensor.requires_grad:
        tensor.grad = gradient if tensor.grad is None else tensor.grad + gradient


def full_matching(
    steps: KDSteps,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    batches: list[torch.Tensor],
    augmentations: Sequence[Augmentation] | None = None,
) -> torch.Tensor:
    """The matching loss through the full unroll; backpropagates into X, Y, α. Shapes: see module doc."""
    end = unroll_sgd(steps, start, images, representations, lr, batches, augmentations=augmentations)
    loss = trajectory_matching_loss(end, start, target)
    loss.backward()
    return loss.detach()


Snapshots = str | int  # an adjoint snapshot policy: a SNAPSHOTS name or a budget K (module doc)


def check_snapshots(snapshots: Snapshots, num_steps: int) -> None:
    """A one-line error unless ``snapshots`` is a SNAPSHOTS name or a budget K >= 1 that can unroll N =
    ``num_steps`` steps recomputing each at most once (N <= K(K + 1) / 2)."""
    if isinstance(snapshots, str) and snapshots in SNAPSHOTS:
        return
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 1:
        raise SslkdError(
            f"unknown adjoint snapshots {snapshots!r}; choose one of {', '.join(SNAPSHOTS)} "
            "or a number of snapshots >= 1"
        )
    if snapshots * (snapshots + 1) // 2 < num_steps:
        least = next(k for k in range(1, num_steps + 1) if k * (k + 1) // 2 >= num_steps)
        raise SslkdError(
            f"an adjoint snapshot budget of {snapshots} cannot unroll {num_steps} inner steps "
            f"(a budget K unrolls at most K(K + 1)/2; {num_steps} needs {least} or more)"
        )


def segment_lengths(num_steps: int, snapshots: Snapshots) -> list[int]:
    """The adjoint's checkpoint segments, in step order (they sum to N = ``num_steps``): the forward sweep
    keeps the first snapshot of each segment and every snapshot of the last; the backward sweep recomputes
    the rest of each earlier segment from its first. ``all``: N segments of one step; ``sqrt``: segments of
    ⌈√N⌉ steps (the last one shorter); a budget K: at most K snapshots alive and N − K steps recomputed
    (none when N <= K), with the fewest segments m whose lengths, counted from the last, are at most
    K − m + 1, K − m + 2, …, K (a segment can be as long as the snapshots its processed successors free)."""
    check_snapshots(snapshots, num_steps)
    if isinstance(snapshots, str):
        interval = 1 if snapshots == "all" else math.isqrt(max(num_steps - 1, 0)) + 1
        return [min(interval, num_steps - first) for first in range(0, num_steps, interval)]
    budget = snapshots
    segments = next(m for m in range(1, budget + 1) if m * (budget - m) + m * (m + 1) // 2 >= num_steps)
    lengths, remaining = [], num_steps  # from the last segment backwards, each as long as it may be
    for from_last in range(1, segments + 1):
        lengths.append(min(budget - segments + from_last, remaining - (segments - from_last)))
        remaining -= lengths[-1]
    return lengths[::-1]


def sgd_steps(
    steps: KDSteps,
    start: torch.Tensor,
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    batches: list[torch.Tensor],
    augmentations: list[Augmentation | None],
) -> list[torch.Tensor]:
    """θ_0..θ_n for the n = len(batches) given minibatches (each with its step's augmentation or None),
    without a graph: start θ_0 [P]; images [M, C, H, W], representations [M, D] and lr α (scalar) detached.
    Returns n + 1 tensors [P]; the same inputs give bit-identical snapshots (the checkpointed adjoint's
    recomputation relies on it)."""
    snapshots = [start]
    for batch, augmentation in zip(batches, augmentations, strict=True):
        with torch.no_grad():
            inputs = step_images(images, batch, augmentation)
        snapshots.append(steps.sgd_step(snapshots[-1], inputs, representations[batch], lr))
    return snapshots


def adjoint_matching(
    steps: KDSteps,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    batches: list[torch.Tensor],
    snapshots: Snapshots = "all",
    augmentations: Sequence[Augmentation] | None = None,
) -> torch.Tensor:
    """The matching loss and its exact gradients by the adjoint recursion (module doc), accumulated into
    ``.grad`` of images X [M, C, H, W], representations Y [M, D] and lr α (scalar) where they require it.

    start θ₀, target θ* [P] (constants); batches: one index tensor per inner step; snapshots: ``all``,
    ``sqrt`` (checkpointed: ≈ 2√N snapshots alive instead of N, for fewer than N extra inner steps) or a
    budget K (at most K alive, N − K extra inner steps); augmentations: one differentiable a_k per step
    (None: identity), whose vector-Jacobian product carries ∂/∂a_k(X_b) back to X_b.
    """
    alpha, data, targets = lr.detach(), images.detach(), representations.detach()
    inputs = list(zip(batches, _augmentations(batches, augmentations), strict=True))
    bounds = list(itertools.accumulate(segment_lengths(len(batches), snapshots), initial=0))
    segments = [inputs[first:end] for first, end in itertools.pairwise(bounds)]

    def sweep(theta: torch.Tensor, segment: list) -> list[torch.Tensor]:
        return sgd_steps(steps, theta, data, targets, alpha, [b for b, _ in segment], [a for _, a in segment])

    checkpoints = [start.detach()]  # each segment's first θ: what the forward sweep keeps of all but the last
    for segment in segments[:-1]:
        checkpoints.append(sweep(checkpoints[-1], segment)[-1])
    segment_snapshots = sweep(checkpoints.pop(), segments[-1])  # kept
    end = segment_snapshots.pop().requires_grad_(True)
    loss = trajectory_matching_loss(end, start.detach(), target.detach())
    (adjoint,) = torch.autograd.grad(loss, end)
    grad_images, grad_targets = torch.zeros_like(data), torch.zeros_like(targets)
    grad_lr = torch.zeros_like(alpha)
    for segment in reversed(segments):
        if not segment_snapshots:  # θ_js..θ_js+s−1, recomputed from the segment's checkpoint
            segment_snapshots = sweep(checkpoints.pop(), segment[:-1])
        for batch, augmentation in reversed(segment):
            if augmentation is None:
                gradient, hvp, d_images, d_targets = steps.gradient_of_gradient(
                    segment_snapshots.pop(), data[batch], targets[batch], adjoint
                )
            else:
                augmented, pullback = torch.func.vjp(augmentation, data[batch])[:2]  # linear: exact at any point
                gradient, hvp, d_augmented, d_targets = steps.gradient_of_gradient(
                    segment_snapshots.pop(), augmented, targets[batch], adjoint
                )
                (d_images,) = pullback(d_augmented)
            grad_lr -= torch.dot(adjoint, gradient)
            grad_images.index_add_(0, batch, d_images)  # × −α at the end: α is the same in every step
            grad_targets.index_add_(0, batch, d_targets)
            adjoint = adjoint - alpha * hvp
    _accumulate(images, -alpha * grad_images)
    _accumulate(representations, -alpha * grad_targets)
    _accumulate(lr, grad_lr)
    return loss.detach()


def match_trajectory(
    unroll: str,
    steps: KDSteps,
    start: torch.Tensor,
    target: torch.Tensor,
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    batches: list[torch.Tensor],
    snapshots: Snapshots = "all",
    augmentations: Sequence[Augmentation] | None = None,
) -> torch.Tensor:
    """The matching loss of one segment with gradients accumulated into X, Y, α by the chosen unroll;
    ``snapshots`` (``all`` | ``sqrt`` | a budget K) is the adjoint's (the full unroll keeps its whole
    graph anyway); ``augmentations``: one differentiable augmentation per inner step, or None."""
    if unroll == "adjoint":
        return adjoint_matching(steps, start, target, images, representations, lr, batches, snapshots, augmentations)
    if unroll == "full":
        return full_matching(steps, start, target, images, representations, lr, batches, augmentations)
    raise SslkdError(f"unknown unroll {unroll!r}; choose one of {', '.join(UNROLLS)}")

"""The KD steps on a flat parameter vector θ [P] that the inner loops run thousands of times — a
training step (SGD with momentum and weight decay), a plain inner SGD step and the gradient-of-gradient
of trajectory matching's adjoint — eager, or compiled once per stage with ``torch.compile``, and the KD
training loop of experts and pre-training built on them.

Every step is a pure function of tensors (θ, momentum buffer, minibatch, lr), so one compiled graph
serves every expert, pre-training run and distillation iteration of a stage. Compiled and eager results
agree to float rounding, not bit for bit; each is deterministic on CPU for a given machine and thread
count.

The training step (experts, pre-training) can run its forward pass in bfloat16 autocast (``precision``):
mixed precision as torch.autocast does it, float32 parameters, momentum and update, the loss in float32;
on CPUs with AMX or AVX512-BF16 and on GPUs the convolutions then run on bfloat16 units. Distillation's
inner step and gradient-of-gradient always run in float32: their gradients are matched, not only followed.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, vjp

from sslkd.data.augmentations import DSAConfig, dsa
from sslkd.errors import SslkdError
from sslkd.losses import TARGET_LOSSES
from sslkd.models import ConvNet, ParameterLayout, write_out_instance_norms

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# precision name -> the autocast dtype of the training step's forward pass (None: plain float32)
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise SslkdError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def check_target_loss(target_loss: str) -> None:
    if target_loss not in TARGET_LOSSES:
        raise SslkdError(f"unknown target loss {target_loss!r}; choose one of {', '.join(TARGET_LOSSES)}")


def kd_loss_of_parameters(student: nn.Module, layout: ParameterLayout, target_loss: str = "mse") -> Loss:
    """ℓ(θ, X, Y) = MSE(f(X; θ), Y) (or another of losses.TARGET_LOSSES) for flat θ [P], images X
    [B, C, H, W], targets Y [B, D] -> scalar."""
    check_target_loss(target_loss)
    criterion = TARGET_LOSSES[target_loss]

    def loss(parameters: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return criterion(functional_call(student, layout.unflatten(parameters), (images,)), targets)

    return loss


def autocast_loss(loss: Loss, dtype: torch.dtype) -> Loss:
    """``loss`` with its forward pass under torch.autocast(dtype) on the images' device type."""

    def mixed_precision_loss(parameters: torch.Tensor, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=images.device.type, dtype=dtype):
            return loss(parameters, images, targets)

    return mixed_precision_loss


def momentum_update(
    parameters: torch.Tensor,
    velocity: torch.Tensor,
    gradient: torch.Tensor,
    lr: torch.Tensor,
    momentum: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.optim.SGD's update (dampening 0, no Nesterov; a zero buffer is its first step):
    v ← m·v + (g + wd·θ), θ ← θ − lr·v. All of θ, v, g: [P]; lr: scalar tensor."""
    velocity = velocity * momentum + torch.add(gradient, parameters, alpha=weight_decay)
    return parameters - lr * velocity, velocity


class KDSteps:
    """The steps of a student architecture, eager or compiled (``compile``). The student module only
    supplies the architecture: its own parameters are never read.

    Compiled, the training and inner SGD steps run the KD loss compiled by ``torch.compile`` (its backward
    compiled by AOTAutograd) on channels-last images, and the gradient-of-gradient runs compiled
    ``torch.func.vjp(torch.func.grad(loss))`` (a compiled graph cannot be differentiated twice), also on
    channels-last images and with the student's instance norms written out (models.write_out_instance_norms:
    faster differentiated twice, while the training step is faster with ATen's group norm); on this CPU
    these were the fastest of the variants tried (README "Performance": reverse-over-forward, ``grad`` of a
    ``jvp``, and one graph for the whole SGD step were slower).
    Compiled steps are specialised to the shapes of their first call (one compile each); a minibatch of
    another size — the short last batch of an epoch — runs eagerly. ``precision`` (a :data:`PRECISIONS`
    name) applies to :meth:`train_step` only. ``target_loss``: MSE on the targets (KD, the default) or
    cross-entropy against target distributions (losses.TARGET_LOSSES).
    """

    def __init__(
        self,
        student: ConvNet,
        layout: ParameterLayout,
        compile: bool,
        precision: str = "float32",
        target_loss: str = "mse",
    ) -> None:
        check_precision(precision)
        self.student, self.layout, self.compiled = student, layout, compile
        self.loss = kd_loss_of_parameters(student, layout, target_loss)
        autocast_dtype = PRECISIONS[precision]
        # the losses by kind; in float32 the training step shares the plain loss (and its compiled graph)
        self._eager: dict[str, Loss] = {"loss": self.loss}
        self._training_kind = "loss"
        if autocast_dtype is not None:
            self._eager["training_loss"], self._training_kind = (
                autocast_loss(self.loss, autocast_dtype),
                "training_loss",
            )
        self._compiled: dict[str, Callable] = {}
        self._shapes: dict[str, torch.Size] = {}
        if compile:
            # the gradient-of-gradient differentiates the student twice: with its instance norms written out,
            # inductor fuses that into fewer passes over the activations (an adjoint iteration ~1.2× faster on
            # the CPU benchmark; README "Performance")
            gradient = grad(kd_loss_of_parameters(write_out_instance_norms(student), layout, target_loss))

            def gradient_of_gradient(parameters, images, targets, cotangent):
                g, pullback = vjp(gradient, parameters, images, targets)
                return (g, *pullback(cotangent))

            self._compiled = {kind: torch.compile(loss, dynamic=False) for kind, loss in self._eager.items()}
            self._compiled["gog"] = torch.compile(gradient_of_gradient, dynamic=False)

    def _loss_for(self, kind: str, images: torch.Tensor) -> tuple[Loss, torch.Tensor]:
        """The (compiled or eager) loss of ``kind`` to differentiate for this minibatch, and the images it
        takes."""
        if self._use_compiled(kind, images):
            return self._compiled[kind], images.contiguous(memory_format=torch.channels_last)
        return self._eager[kind], images

    def _use_compiled(self, kind: str, images: torch.Tensor) -> bool:
        if kind not in self._compiled:
            return False
        return self._shapes.setdefault(kind, images.shape) == images.shape

    def train_step(
        self,
        parameters: torch.Tensor,
        velocity: torch.Tensor,
        images: torch.Tensor,
        targets: torch.Tensor,
        lr: torch.Tensor,
        momentum: float,
        weight_decay: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One SGD-with-momentum step on the KD loss: θ, v [P], images [B, C, H, W], targets [B, D], lr
        scalar tensor -> (θ', v', loss before the step), all without autograd history. The forward pass runs
        in the steps' ``precision``; θ, v, the gradient and the loss are float32."""
        loss, images = self._loss_for(self._training_kind, images)
        parameters = parameters.detach().requires_grad_(True)
        value = loss(parameters, images, targets)
        (gradient,) = torch.autograd.grad(value, parameters)
        with torch.no_grad():
            return *momentum_update(parameters, velocity, gradient, lr, momentum, weight_decay), value.detach()

    def sgd_step(
        self, parameters: torch.Tensor, images: torch.Tensor, targets: torch.Tensor, lr: torch.Tensor
    ) -> torch.Tensor:
        """θ − α ∇ℓ(θ; X_b, Y_b) without a graph: θ [P], images [B, C, H, W], targets [B, D], lr scalar."""
        loss, images = self._loss_for("loss", images)
        parameters = parameters.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(parameters, images, targets), parameters)
        return (parameters - lr * gradient).detach()

    def gradient_of_gradient(
        self,
        parameters: torch.Tensor,
        images: torch.Tensor,
        targets: torch.Tensor,
        cotangent: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """g = ∇_θ ℓ(θ; X_b, Y_b) and the gradient of ⟨λ, g⟩ w.r.t. (θ, X_b, Y_b), from one double backward.

        parameters θ, cotangent λ: [P]; images [B, C, H, W]; targets [B, D]. Returns (g [P], H λ [P],
        ∂⟨λ, g⟩/∂X_b [B, C, H, W], ∂⟨λ, g⟩/∂Y_b [B, D]).
        """
        if self._use_compiled("gog", images):
            images = images.contiguous(memory_format=torch.channels_last)
            return tuple(t.detach() for t in self._compiled["gog"](parameters, images, targets, cotangent))
        parameters, images, targets = (t.detach().requires_grad_(True) for t in (parameters, images, targets))
        (gradient,) = torch.autograd.grad(self.loss(parameters, images, targets), parameters, create_graph=True)
        hvp, d_images, d_targets = torch.autograd.grad(gradient, (parameters, images, targets), cotangent)
        return gradient.detach(), hvp, d_images, d_targets


def train_kd(
    steps: KDSteps,
    parameters: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    epochs: int,
    generator: torch.Generator,
    velocity: torch.Tensor | None = None,
    augment: DSAConfig | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """KD training with SGD (momentum, weight decay, constant lr) from θ [P] on images [N, C, H, W] and
    targets [N, D], one seeded permutation per epoch. Yields (θ after the epoch [P], the momentum
    buffer [P], the epoch's mean per-example loss) for each epoch; a non-finite loss stops with an
    error. ``velocity`` resumes from a saved momentum buffer (default: zeros); ``augment``: each minibatch
    differentiably augmented (DSA, drawn from ``generator``; the targets are kept)."""
    velocity = torch.zeros_like(parameters) if velocity is None else velocity
    lr_tensor = torch.tensor(lr, dtype=parameters.dtype, device=parameters.device)
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator).to(images.device)
        total = parameters.new_zeros(())
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            inputs = images[batch] if augment is None else dsa(images[batch], augment, generator)
            parameters, velocity, loss = steps.train_step(
                parameters, velocity, inputs, targets[batch], lr_tensor, momentum, weight_decay
            )
            total += loss * len(batch)
        mean_loss = total.item() / len(images)
        if not math.isfinite(mean_loss):
            raise SslkdError(f"KD training loss became {mean_loss} in epoch {epoch} (lr {lr}): lower the lr")
        yield parameters, velocity, mean_loss

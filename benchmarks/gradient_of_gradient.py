"""Micro-benchmark of the adjoint's per-step kernels and the alternatives tried for them (issue 7), on one
CPU thread: the gradient-of-gradient as reverse-over-reverse (the eager default), torch.func.vjp of
torch.func.grad (compiled on contiguous and channels-last images, and as KDSteps compiles it: channels-last
with the student's instance norms written out) and reverse-over-forward
(torch.func.grad of a torch.func.jvp: ⟨λ, ∇ℓ⟩ is the directional derivative of ℓ along λ); the inner SGD
step as KDSteps runs it (compiled loss, AOTAutograd backward) and as one compiled graph with the update;
and one step of the full create-graph unroll, its share of the final backward included.

    python benchmarks/gradient_of_gradient.py                 # all variants, 15 interleaved rounds
    python benchmarks/gradient_of_gradient.py --rounds 40 compiled_vjp_grad compiled_vjp_grad_channels_last

Prints, per variant, the fastest and the median process CPU milliseconds of a call (CPU time, so that other
load on the machine costs little), the variants interleaved round by round. The compiled variants compile
on their first call (about a minute each with a cold inductor cache). Width-32 ConvNet, batch 64, 32×32
images, D 512: the CPU preset of benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.func import grad, jvp, vjp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslkd.methods.experts import build_student  # noqa: E402
from sslkd.methods.kd_steps import KDSteps  # noqa: E402
from sslkd.models import ConvNetConfig, ParameterLayout  # noqa: E402


def reverse_over_forward(loss: Callable) -> Callable:
    """(θ, X, Y, λ) -> (⟨λ, ∇ℓ⟩, Hλ, ∂⟨λ, ∇ℓ⟩/∂X, ∂⟨λ, ∇ℓ⟩/∂Y): grad over jvp, one backward."""

    def gradient_of_gradient(parameters, images, targets, cotangent):
        def directional(parameters, images, targets):
            _, derivative = jvp(lambda theta: loss(theta, images, targets), (parameters,), (cotangent,))
            return derivative, derivative

        (hvp, d_images, d_targets), derivative = grad(directional, argnums=(0, 1, 2), has_aux=True)(
            parameters, images, targets
        )
        return derivative, hvp, d_images, d_targets

    return gradient_of_gradient


def reverse_over_reverse(loss: Callable) -> Callable:
    """(θ, X, Y, λ) -> (∇ℓ, Hλ, ∂⟨λ, ∇ℓ⟩/∂X, ∂⟨λ, ∇ℓ⟩/∂Y) by torch.func.vjp of torch.func.grad."""
    gradient = grad(loss)

    def gradient_of_gradient(parameters, images, targets, cotangent):
        value, pullback = vjp(gradient, parameters, images, targets)
        return (value, *pullback(cotangent))

    return gradient_of_gradient


def variants() -> dict[str, Callable[[], object]]:
    """Every variant as a no-argument call on one fixed problem."""
    generator = torch.Generator().manual_seed(0)
    student = build_student(ConvNetConfig(32, 3), (3, 32, 32), 512, seed=0)
    layout = ParameterLayout.of(student)
    eager, compiled = KDSteps(student, layout, compile=False), KDSteps(student, layout, compile=True)
    loss = eager.loss
    theta = layout.flatten(student)
    images = torch.randn(64, 3, 32, 32, generator=generator)
    channels_last = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randn(64, 512, generator=generator)
    cotangent = 1e-2 * torch.randn(theta.shape, generator=generator)
    lr = torch.tensor(0.01)
    vjp_grad = torch.compile(reverse_over_reverse(loss), dynamic=False)
    forward = torch.compile(reverse_over_forward(loss), dynamic=False)
    whole_step = torch.compile(lambda p, x, y, a: p - a * grad(loss)(p, x, y), dynamic=False)

    def full_step() -> None:
        parameters, data = theta.detach().requires_grad_(True), images.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(parameters, data, targets), parameters, create_graph=True)
        torch.autograd.grad(parameters - lr * gradient, (parameters, data), cotangent)

    return {
        "eager_reverse_over_reverse": lambda: eager.gradient_of_gradient(theta, images, targets, cotangent),
        "eager_vjp_grad": lambda: reverse_over_reverse(loss)(theta, images, targets, cotangent),
        "eager_reverse_over_forward": lambda: reverse_over_forward(loss)(theta, images, targets, cotangent),
        "compiled_vjp_grad": lambda: vjp_grad(theta, images, targets, cotangent),
        "compiled_vjp_grad_channels_last": lambda: vjp_grad(theta, channels_last, targets, cotangent),
        # KDSteps' compiled default: the same on channels-last images with the instance norms written out
        "compiled_vjp_grad_channels_last_written_out_norms": lambda: compiled.gradient_of_gradient(
            theta, images, targets, cotangent
        ),
        "compiled_reverse_over_forward": lambda: forward(theta, images, targets, cotangent),
        "eager_sgd_step": lambda: eager.sgd_step(theta, images, targets, lr),
        "compiled_sgd_step": lambda: compiled.sgd_step(theta, images, targets, lr),
        "compiled_whole_sgd_step": lambda: whole_step(theta, images, targets, lr),
        "full_unroll_step": full_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="variants to time (default: all)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    calls = variants()
    names = args.names or list(calls)
    unknown = set(names) - set(calls)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(calls)}")
    for name in names:  # compiles the compiled ones
        calls[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            began = time.process_time()
            calls[name]()
            seconds[name].append(time.process_time() - began)
    print(f"| variant | fastest ms | median ms |  ({args.rounds} rounds, 1 thread, process CPU time)\n|---|---|---|")
    for name in names:
        ordered = sorted(seconds[name])
        print(f"| {name} | {1000 * ordered[0]:.1f} | {1000 * ordered[len(ordered) // 2]:.1f} |")


if __name__ == "__main__":
    main()

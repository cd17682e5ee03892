"""What a trajectory-matching iteration costs (MKDT's distillation step: gradients of the images X, the
representations Y and α through ``syn_steps`` unrolled student steps): the unroll variants compared, each
in a worker process of its own (benchmarks/run.py), and their rows of the results."""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from measurement import count_flops, paired_ratio, peak_memory, reset_peak_memory, serve, student_for

from sslkd.methods.kd_steps import KDSteps
from sslkd.methods.unroll import match_trajectory

VARIANTS = {  # name -> (unroll, compiled, the adjoint's snapshots, $SSLKD_MALLOC: sslkd/infra/allocator.py)
    "full": ("full", False, "all", "keep"),
    "adjoint": ("adjoint", False, "all", "keep"),
    "adjoint_compiled": ("adjoint", True, "all", "keep"),
    "adjoint_sqrt": ("adjoint", False, "sqrt", "keep"),
    "adjoint_compiled_sqrt": ("adjoint", True, "sqrt", "keep"),
    # at most 14 snapshots alive: the 10 of syn_steps 10 and 4 more (4.5 MB, ≈ +7% of the CPU preset's
    # 65-70 MB live at syn_steps 10), for 26 recomputed steps at syn_steps 40 where sqrt recomputes 30
    "adjoint_compiled_budget14": ("adjoint", True, 14, "keep"),
    # glibc's default allocator (no stage runs so unless told to): what keeping freed memory gains
    "full_system_malloc": ("full", False, "all", "system"),
    "adjoint_compiled_system_malloc": ("adjoint", True, "all", "system"),
}
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}  # glibc: mmap (and unmap when freed) blocks ≥ 128 KiB


def distill_iteration(args: argparse.Namespace, device: torch.device, compiled: bool) -> Callable[[], None]:
    """One trajectory-matching iteration of ``args.variant`` (gradients of X, Y, α), on tensors seeded alike
    for every call."""
    unroll, _, snapshots, _ = VARIANTS[args.variant]
    generator = torch.Generator().manual_seed(0)
    student, layout = student_for(args, device)
    steps = KDSteps(student, layout, compile=compiled)
    start = layout.flatten(student)
    target = start + 0.01 * torch.randn(start.shape, generator=generator).to(device)
    images = torch.randn(args.size, 3, args.image_size, args.image_size, generator=generator).to(device)
    images.requires_grad_(True)
    representations = torch.randn(args.size, args.dim, generator=generator).to(device).requires_grad_(True)
    lr = torch.tensor(0.01, device=device, requires_grad=True)
    batches = [torch.randperm(args.size, generator=generator)[: args.batch].to(device) for _ in range(args.syn_steps)]

    def iteration() -> None:
        for tensor in (images, representations, lr):
            tensor.grad = None
        match_trajectory(unroll, steps, start, target, images, representations, lr, batches, snapshots)

    return iteration


def distill_worker(args: argparse.Namespace, device: torch.device) -> dict:
    """Trajectory-matching iterations (gradients of X, Y, α), served (:func:`serve`); at the end, the peak
    memory over the timed calls and the FLOPs of one call."""
    baseline = serve(distill_iteration(args, device, VARIANTS[args.variant][1]), device)
    peak = peak_memory(device) - baseline
    flops = count_flops(distill_iteration(args, device, compiled=False))
    return {"peak_mb": peak, "gflop": flops / 1e9}


def distill_memory_worker(args: argparse.Namespace, device: torch.device) -> dict:
    """Peak memory of one iteration after a warm-up: run with LIVE_MEMORY_ENV, the memory it holds."""
    iteration = distill_iteration(args, device, VARIANTS[args.variant][1])
    iteration()
    baseline = reset_peak_memory(device)
    iteration()
    return {"peak_live_mb": peak_memory(device) - baseline}


def matching_summary(basis: str, distill: dict) -> dict:
    """The distill variants' figures on one time basis (wall or cpu): s/iteration, peak memory, GFLOP/s,
    compile seconds, and the targets' ratios (× the full unroll, live-memory growth)."""
    summary = {}
    for variant, by_steps in distill.items():
        summary[variant] = {}
        for steps, raw in by_steps.items():
            seconds = raw["steady"][basis]
            summary[variant][steps] = {
                "s_per_iter": seconds,
                "peak_mb": raw["peak_mb"],
                "peak_live_mb": raw["peak_live_mb"],
                "gflop_per_iter": raw["gflop"],
                "gflops": raw["gflop"] / seconds,
                "compile_s": max(raw["first"][basis] - seconds, 0.0),
                "wall_s_per_iter": raw["steady"]["wall"],
                "cpu_s_per_iter": raw["steady"]["cpu"],
            }
    for variant, by_steps in summary.items():  # the targets' ratios: × the full unroll, live-memory growth
        smallest = by_steps[min(by_steps, key=int)]["peak_live_mb"]
        for steps, figures in by_steps.items():
            if steps in summary.get("full", {}):
                figures["speedup_vs_full"] = summary["full"][steps]["s_per_iter"] / figures["s_per_iter"]
                figures["speedup_vs_full_paired"] = paired_ratio(
                    distill["full"][steps]["calls"], distill[variant][steps]["calls"], basis
                )
            figures["peak_live_growth"] = figures["peak_live_mb"] / smallest - 1
    return summary


def matching_table(results: dict) -> list[str]:
    """The distill variants' table (markdown lines) of the results benchmarks/run.py writes."""
    peak = results["matmul_gflops"]
    lines = [
        "| distill variant | syn_steps | s / iteration | × full | × full, paired | peak MB | peak live MB "
        "| live growth | compile s | GFLOP/s | % of matmul |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, by_steps in results["distill"].items():
        for steps, r in by_steps.items():
            speedup = (
                f"{r['speedup_vs_full']:.2f} | {r['speedup_vs_full_paired']:.2f}" if "speedup_vs_full" in r else "– | –"
            )
            lines.append(
                f"| {variant} | {steps} | {r['s_per_iter']:.3f} | {speedup} | {r['peak_mb']:.0f} | "
                f"{r['peak_live_mb']:.0f} | {100 * r['peak_live_growth']:+.1f}% | {r['compile_s']:.0f} | "
                f"{r['gflops']:.1f} | {100 * r['gflops'] / peak:.0f}% |"
            )
    return lines

"""What training an expert costs (SGD with momentum and weight decay on the KD loss, one batch per step):
eager against torch.compile, float32 against bfloat16 autocast, the stages' host allocator against glibc's
defaults, each variant in a worker process of its own (benchmarks/run.py), and their rows of the results."""

from __future__ import annotations

import argparse

import torch
from measurement import count_flops, paired_ratio, serve, student_for

from sslkd.methods.kd_steps import KDSteps

EXPERT_VARIANTS = {  # name -> (compiled, precision of the training step, $SSLKD_MALLOC)
    "eager": (False, "float32", "keep"),
    "compiled": (True, "float32", "keep"),
    "eager_bfloat16": (False, "bfloat16", "keep"),
    "compiled_bfloat16": (True, "bfloat16", "keep"),
    "eager_system_malloc": (False, "float32", "system"),
    "compiled_system_malloc": (True, "float32", "system"),
}


def compile_key(variant: str) -> str:
    """The summary key of a compiled expert variant's compile seconds: compile_s, compile_bfloat16_s."""
    return f"compile{variant.removeprefix('compiled')}_s"


def experts_worker(args: argparse.Namespace, device: torch.device) -> dict:
    """Expert training steps (SGD with momentum and weight decay on the KD loss, one batch), served
    (:func:`serve`); at the end, the FLOPs of one step."""
    generator = torch.Generator().manual_seed(0)
    student, layout = student_for(args, device)
    compiled, precision, _ = EXPERT_VARIANTS[args.variant]
    steps = KDSteps(student, layout, compile=compiled, precision=precision)
    parameters = layout.flatten(student)
    velocity = torch.zeros_like(parameters)
    images = torch.randn(args.expert_batch, 3, args.image_size, args.image_size, generator=generator).to(device)
    targets = torch.randn(args.expert_batch, args.dim, generator=generator).to(device)
    lr = torch.tensor(0.01, device=device)

    def step() -> None:
        nonlocal parameters, velocity
        parameters, velocity, _ = steps.train_step(parameters, velocity, images, targets, lr, 0.9, 1e-4)

    serve(step, device)
    flops = count_flops(
        lambda: KDSteps(student, layout, compile=False).train_step(parameters, velocity, images, targets, lr, 0.9, 1e-4)
    )
    return {"gflop": flops / 1e9}


def experts_summary(basis: str, experts: dict, stage_images: int) -> dict:
    """The expert variants' figures on one time basis (wall or cpu): images/s, GFLOP/s, the paired ratios to
    eager training, compile seconds and the images/s of a ``stage_images`` stage with the compile included.
    ``experts``: the raw results per variant and the batch size (``batch``)."""
    batch, figures = experts["batch"], {"stage_images": stage_images, "batch": experts["batch"]}
    for variant, (compiled, _, _) in EXPERT_VARIANTS.items():
        if variant not in experts:
            continue
        seconds = experts[variant]["steady"][basis]
        figures[f"{variant}_img_s"] = batch / seconds
        figures[f"{variant}_gflops"] = experts[variant]["gflop"] / seconds
        for reference in ("eager", "eager_system_malloc"):  # the median over rounds of the within-round ratio
            if reference in experts:
                figures[f"{variant}_x_{reference}_paired"] = paired_ratio(
                    experts[reference]["calls"], experts[variant]["calls"], basis
                )
        if compiled:
            compile_s = max(experts[variant]["first"][basis] - seconds, 0.0)
            figures[compile_key(variant)] = compile_s
            figures[f"{variant}_img_s_with_compile"] = stage_images / (stage_images * seconds / batch + compile_s)
    return figures


def experts_table(results: dict) -> list[str]:
    """The expert variants' table (markdown lines) of the results benchmarks/run.py writes."""
    e = results["experts"]
    lines = [
        "| expert training | images/s | × eager float32 | × eager, paired "
        "| × eager, system malloc, paired | GFLOP/s | % of matmul (its precision) | compile s "
        f"| images/s, compile included ({e['stage_images']:,} images) | × eager float32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant, (compiled, precision, _) in EXPERT_VARIANTS.items():
        if f"{variant}_img_s" not in e:
            continue
        reference = results["matmul_gflops"] if precision == "float32" else results["matmul_bfloat16_gflops"]
        rate, gflops = e[f"{variant}_img_s"], e[f"{variant}_gflops"]
        paired = " | ".join(
            f"{e[key]:.2f}" if key in e else "–"
            for key in (f"{variant}_x_eager_paired", f"{variant}_x_eager_system_malloc_paired")
        )
        row = (
            f"| {variant} | {rate:.0f} | {rate / e['eager_img_s']:.2f} | {paired} | {gflops:.1f} | "
            f"{100 * gflops / reference:.0f}% | "
        )
        if compiled:
            with_compile = e[f"{variant}_img_s_with_compile"]
            row += f"{e[compile_key(variant)]:.0f} | {with_compile:.0f} | {with_compile / e['eager_img_s']:.2f} |"
        else:
            row += "– | | |"
        lines.append(row)
    return lines

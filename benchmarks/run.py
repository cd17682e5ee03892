"""Benchmark of sslkd's inner loops on this machine, in one run: trajectory-matching iterations
(full vs adjoint unroll, eager and compiled) at two syn_steps, expert training (eager vs compiled),
and a dense-matmul GFLOP/s reference that says how close to the machine's limit they run.

    python benchmarks/run.py --out benchmark.json                  # CPU: width 32, batch 64, 32×32, D 512
    python benchmarks/run.py --out benchmark.json --device cuda    # the paper setting: width 128, batch 256

Every measurement runs in a fresh subprocess (``--worker``) so that peak memory is its own: on CPU the
peak RSS (VmHWM) after a warm-up iteration, the heap trimmed (malloc_trim) and the peak reset
(/proc/self/clear_refs), minus the RSS at that moment; on CUDA torch.cuda.max_memory_allocated minus
the allocated memory at the same point. FLOPs are counted with torch.utils.flop_counter.FlopCounterMode
on one eager call (the compiled variant does the same arithmetic).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslkd.experts import build_student  # noqa: E402
from sslkd.kd_steps import KDSteps  # noqa: E402
from sslkd.models import ConvNetConfig, ParameterLayout  # noqa: E402
from sslkd.unroll import match_trajectory  # noqa: E402

VARIANTS = {"full": ("full", False), "adjoint": ("adjoint", False), "adjoint_compiled": ("adjoint", True)}
PRESETS = {  # width, batch_syn, synthetic set size M, image size, D, syn_steps, expert batch
    "cpu": dict(width=32, batch=64, size=256, image_size=32, dim=512, syn_steps=[10, 40], expert_batch=256),
    "paper": dict(width=128, batch=256, size=1000, image_size=32, dim=512, syn_steps=[10, 40], expert_batch=256),
}
# A default-sized experts stage for the compile-included rate: the cifar10_cpu setting
# (8 experts × 4 epochs × 10k images) on CPU, the paper's CIFAR experts (100 × 4 epochs × 50k) on CUDA.
STAGE_IMAGES = {"cpu": 8 * 4 * 10_000, "paper": 100 * 4 * 50_000}


# --- measurement helpers (run inside a worker) -------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_memory(device: torch.device) -> float:
    """Start a peak-memory window; returns the current usage in MB (the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so the baseline is what is live
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
    return _rss_kb("VmRSS") / 1024


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _rss_kb("VmHWM") / 1024


class _NoModuleTracking:
    """Stands in for FlopCounterMode's per-module tracker, whose hooks on module inputs make
    torch.autograd.grad w.r.t. a leaf input (the eager gradient-of-gradient) fail; totals only."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


def timed(run, repeats: int, device: torch.device) -> tuple[float, float]:
    """(fastest, median) seconds of ``repeats`` calls; the fastest is the least disturbed by other load."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - began)
    times.sort()
    return times[0], times[len(times) // 2]


def count_flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        run()
    return counter.get_total_flops()


def student_for(args: argparse.Namespace, device: torch.device):
    student = build_student(ConvNetConfig(args.width, 3), (3, args.image_size, args.image_size), args.dim, seed=0)
    return student.to(device), ParameterLayout.of(student)


def distill_worker(args: argparse.Namespace, device: torch.device) -> dict:
    """s/iteration and peak memory of trajectory-matching iterations (gradients of X, Y, α)."""
    unroll, compiled = VARIANTS[args.variant]
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
        match_trajectory(unroll, steps, start, target, images, representations, lr, batches)

    began = time.perf_counter()
    iteration()  # warm-up; compiles the compiled variant
    synchronize(device)
    first_s = time.perf_counter() - began
    baseline = reset_peak_memory(device)
    seconds, median = timed(iteration, args.iterations, device)
    peak = peak_memory(device) - baseline
    eager_unroll = KDSteps(student, layout, compile=False)
    flops = count_flops(lambda: match_trajectory(unroll, eager_unroll, start, target, images, representations,
                                                 lr, batches))
    return {"s_per_iter": seconds, "s_per_iter_median": median, "peak_mb": peak, "first_iter_s": first_s,
            "compile_s": max(first_s - seconds, 0.0) if compiled else 0.0,
            "gflop_per_iter": flops / 1e9, "gflops": flops / 1e9 / seconds}


def experts_worker(args: argparse.Namespace, device: torch.device) -> dict:
    """Images/s of the expert training step (SGD with momentum and weight decay on the KD loss)."""
    generator = torch.Generator().manual_seed(0)
    student, layout = student_for(args, device)
    steps = KDSteps(student, layout, compile=args.variant == "compiled")
    parameters = layout.flatten(student)
    velocity = torch.zeros_like(parameters)
    images = torch.randn(args.expert_batch, 3, args.image_size, args.image_size, generator=generator).to(device)
    targets = torch.randn(args.expert_batch, args.dim, generator=generator).to(device)
    lr = torch.tensor(0.01, device=device)

    def step() -> None:
        nonlocal parameters, velocity
        parameters, velocity, _ = steps.train_step(parameters, velocity, images, targets, lr, 0.9, 1e-4)

    began = time.perf_counter()
    step()
    synchronize(device)
    first_s = time.perf_counter() - began
    step()
    seconds, median = timed(step, args.expert_steps, device)
    flops = count_flops(lambda: KDSteps(student, layout, compile=False).train_step(
        parameters, velocity, images, targets, lr, 0.9, 1e-4))
    return {"img_s": args.expert_batch / seconds, "img_s_median": args.expert_batch / median, "s_per_step": seconds,
            "compile_s": max(first_s - seconds, 0.0) if args.variant == "compiled" else 0.0,
            "gflops": flops / 1e9 / seconds}


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul throughput: the machine's practical limit for these workloads."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    fastest, _ = timed(lambda: a @ b, repeats, device)
    return 2 * size**3 / fastest / 1e9


# --- driver ------------------------------------------------------------------------------------------

def run_worker(args: argparse.Namespace, kind: str, variant: str, syn_steps: int = 0) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--variant", variant, "--syn-steps", str(syn_steps),
               "--device", args.device, "--width", str(args.width), "--batch", str(args.batch),
               "--size", str(args.size), "--image-size", str(args.image_size), "--dim", str(args.dim),
               "--iterations", str(args.iterations), "--expert-batch", str(args.expert_batch),
               "--expert-steps", str(args.expert_steps)] + (["--threads", str(args.threads)] if args.threads else [])
    with tempfile.TemporaryDirectory(prefix="sslkd-bench-inductor-") as cache:  # every compile is a cold one
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if result.returncode != 0:
        sys.exit(f"worker {kind}/{variant}/{syn_steps} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results: dict) -> str:
    lines = [f"machine: {results['machine']}, {results['threads']} torch threads, torch {results['torch']}; "
             f"load average before / after: {results['load_before']} / {results['load_after']}",
             f"dense matmul: {results['matmul_gflops']:.1f} GFLOP/s", "",
             "| distill variant | syn_steps | s / iteration | peak MB | first iteration s | GFLOP/s | % of matmul |",
             "|---|---|---|---|---|---|---|"]
    for variant, by_steps in results["distill"].items():
        for steps, r in by_steps.items():
            lines.append(f"| {variant} | {steps} | {r['s_per_iter']:.3f} | {r['peak_mb']:.0f} | {r['first_iter_s']:.1f} | "
                         f"{r['gflops']:.1f} | {100 * r['gflops'] / results['matmul_gflops']:.0f}% |")
    experts = results["experts"]
    lines += ["", "| expert training | images/s | GFLOP/s | % of matmul | compile s |", "|---|---|---|---|---|",
              f"| eager | {experts['eager_img_s']:.0f} | {experts['eager_gflops']:.1f} | "
              f"{100 * experts['eager_gflops'] / results['matmul_gflops']:.0f}% | – |",
              f"| compiled | {experts['compiled_img_s']:.0f} | {experts['compiled_gflops']:.1f} | "
              f"{100 * experts['compiled_gflops'] / results['matmul_gflops']:.0f}% | {experts['compile_s']:.1f} |",
              f"| compiled, compile included ({experts['stage_images']:,} images) | "
              f"{experts['compiled_img_s_with_compile']:.0f} | | | |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the paper setting unless overridden)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu on CPU, paper on CUDA")
    for name in ("width", "batch", "size", "image-size", "dim", "iterations", "expert-batch", "expert-steps"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--syn-steps", type=int, nargs="+")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", choices=["distill", "experts"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    preset = args.preset or ("paper" if device.type == "cuda" else "cpu")
    for key, value in {**PRESETS[preset], "iterations": 3, "expert_steps": 20}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.worker:
        args.syn_steps = args.syn_steps[0]
        worker = distill_worker if args.worker == "distill" else experts_worker
        print(json.dumps(worker(args, device)))
        return
    if args.out is None:
        parser.error("--out is required")
    results = {"machine": torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"CPU, {os.cpu_count()} cores", "threads": torch.get_num_threads(), "device": args.device,
               "torch": torch.__version__,
               "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
               "setting": {key: getattr(args, key) for key in PRESETS["cpu"]},
               "matmul_gflops": matmul_gflops(device), "distill": {}}
    for variant in VARIANTS:
        results["distill"][variant] = {str(n): run_worker(args, "distill", variant, n) for n in args.syn_steps}
    eager, compiled = (run_worker(args, "experts", v) for v in ("eager", "compiled"))
    stage_images = STAGE_IMAGES[preset]
    results["experts"] = {
        "eager_img_s": eager["img_s"], "compiled_img_s": compiled["img_s"], "compile_s": compiled["compile_s"],
        "eager_gflops": eager["gflops"], "compiled_gflops": compiled["gflops"], "stage_images": stage_images,
        "compiled_img_s_with_compile": stage_images / (stage_images / compiled["img_s"] + compiled["compile_s"]),
        "batch": args.expert_batch,
    }
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Benchmark of sslkd's inner loops on this machine, in one run: trajectory-matching iterations
(full vs adjoint unroll, eager and compiled, the adjoint keeping all snapshots, every ⌈√N⌉-th or at
most 14) at two syn_steps, expert training (eager vs compiled, float32 and bfloat16 autocast), and
dense-matmul GFLOP/s references (float32, bfloat16) that say how close to the machine's limit they run.
Each distill row also gives the targets' ratios: × the full unroll at the same syn_steps, of the times
above (``speedup_vs_full``) and the median over rounds of the ratio within a round
(``speedup_vs_full_paired``: each round times every variant back to back, so a slow spell of the
machine falls on both sides of the ratio), and the growth of its peak live memory from the smallest
syn_steps measured (``peak_live_growth``).

    python benchmarks/run.py --out benchmark.json                  # CPU: width 32, batch 64, 32×32, D 512
    python benchmarks/run.py --out benchmark.json --threads 1      # CPU shared with other work (below)
    python benchmarks/run.py --out benchmark.json --device cuda    # the paper setting: width 128, batch 256
    python benchmarks/run.py --out tiny.json --device cuda --preset tinyimagenet_2pct --variants full,adjoint --no-experts
    python benchmarks/run.py --out experts.json --no-distill          # expert training only

Times are the fastest wall-clock call, or — with one CPU thread — the median CPU seconds of the process
and of its finished children (the C++ compiler), which is what a call costs however busy the machine
is; ``time_basis`` in the JSON says which. Compile seconds are the first call minus a steady call, with
a fresh (cold) inductor cache per worker. Every measurement runs in a fresh subprocess (``--worker``) so
that peak memory is its own; the distill variants' workers (at each syn_steps) and the expert variants'
run side by side, idle but for one timed call at a time, in turn, for ``--iterations`` (distill) or
``--expert-steps`` (experts) rounds: a slower or faster spell of the machine falls on every variant alike,
and the "paired" ratios, the median over rounds of the ratio within a round, hold. Peak memory: on CPU the
peak RSS (VmHWM) after a warm-up iteration, the heap trimmed (malloc_trim) and the peak reset
(/proc/self/clear_refs), minus the RSS at that moment; on CUDA torch.cuda.max_memory_allocated minus
the allocated memory at the same point. On CPU that peak (``peak_mb``) includes what glibc's allocator
keeps of freed blocks, which varies by ±15 MB from call to call here; ``peak_live_mb`` is the same
measurement in a second worker whose allocator returns every freed block of 128 KiB or more at once
(MALLOC_MMAP_THRESHOLD_): the memory the computation holds, within a few MB from run to run, but with
allocation too slow to time (on CUDA both are the allocated peak). FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode on one eager call (the compiled variant does the same arithmetic).
Every worker sets the host allocator as the stages do (sslkd/infra/allocator.py: glibc malloc keeping freed
memory); the ``*_system_malloc`` variants keep glibc's defaults, and the expert rows give their ratio to
eager training with glibc's defaults too.

What each part measures lives in a module of its own beside this driver: benchmarks/trajectory_matching.py
(the distill variants), benchmarks/expert_training.py (the expert variants) and benchmarks/measurement.py
(how a worker times a call, its peak memory and FLOPs, and the dense-matmul reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from expert_training import EXPERT_VARIANTS, experts_summary, experts_table, experts_worker  # noqa: E402
from measurement import matmul_seconds, steady  # noqa: E402
from trajectory_matching import (  # noqa: E402
    LIVE_MEMORY_ENV,
    VARIANTS,
    distill_memory_worker,
    distill_worker,
    matching_summary,
    matching_table,
)

from sslkd.infra import allocator  # noqa: E402

PRESETS = {  # width, depth, batch_syn, synthetic set size M, image size, D, syn_steps, expert batch
    "cpu": dict(width=32, depth=3, batch=64, size=256, image_size=32, dim=512, syn_steps=[10, 40], expert_batch=256),
    "paper": dict(
        width=128, depth=3, batch=256, size=1000, image_size=32, dim=512, syn_steps=[10, 40], expert_batch=256
    ),
    # METHOD.md's TinyImageNet 2% row: 2000 images of 64×64, a depth-4 ConvNet, syn_steps 10
    "tinyimagenet_2pct": dict(
        width=128, depth=4, batch=256, size=2000, image_size=64, dim=512, syn_steps=[10], expert_batch=256
    ),
}
# A default-sized experts stage for the compile-included rate: the cifar10_cpu setting
# (8 experts × 4 epochs × 10k images) on CPU, the paper's experts (100 × 4 epochs × 50k or 100k) on CUDA.
STAGE_IMAGES = {"cpu": 8 * 4 * 10_000, "paper": 100 * 4 * 50_000, "tinyimagenet_2pct": 100 * 4 * 100_000}

WORKERS = {"distill": distill_worker, "distill_memory": distill_memory_worker, "experts": experts_worker}


# --- driver ------------------------------------------------------------------------------------------


def worker_command(args: argparse.Namespace, kind: str, variant: str, syn_steps: int) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--variant",
        variant,
        "--syn-steps",
        str(syn_steps),
        "--device",
        args.device,
        "--width",
        str(args.width),
        "--depth",
        str(args.depth),
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--image-size",
        str(args.image_size),
        "--dim",
        str(args.dim),
        "--expert-batch",
        str(args.expert_batch),
    ] + (["--threads", str(args.threads)] if args.threads else [])


def variant_malloc(kind: str, variant: str) -> str:
    """The $SSLKD_MALLOC of a variant's worker."""
    return EXPERT_VARIANTS[variant][2] if kind == "experts" else VARIANTS[variant][3]


def worker_env(cache: str, malloc: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker with inductor cache ``cache`` and allocator ``malloc`` (as a stage sets
    it, unless ``env`` tunes malloc itself)."""
    env = {**os.environ, **(env or {}), "TORCHINDUCTOR_CACHE_DIR": cache, allocator.MALLOC_ENV: malloc}
    if (
        torch.get_num_threads() == 1
    ):  # the CPU-time basis: the C++ compiler runs as a waited-for child, so its time counts
        env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    # (otherwise inductor's default compile workers, as in a stage run)
    return env


def run_worker(
    args: argparse.Namespace, kind: str, variant: str, syn_steps: int, cache: str, env: dict[str, str] | None = None
) -> dict:
    """The JSON a ``--worker kind`` subprocess prints, run to its end with inductor cache ``cache``."""
    result = subprocess.run(
        worker_command(args, kind, variant, syn_steps),
        capture_output=True,
        text=True,
        env=worker_env(cache, variant_malloc(kind, variant), env),
    )
    if result.returncode != 0:
        sys.exit(f"worker {kind}/{variant}/{syn_steps} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def reply(worker: subprocess.Popen, errors, name: str) -> dict:
    """The next JSON line a served worker prints; exits with its stderr (the file ``errors``) if it died."""
    line = worker.stdout.readline()
    if not line:
        worker.wait()
        errors.seek(0)
        sys.exit(f"worker {name} failed:\n{errors.read()[-3000:]}")
    return json.loads(line)


def run_interleaved(
    args: argparse.Namespace, kind: str, variants: list[str], syn_steps: int, rounds: int
) -> dict[str, dict]:
    """The ``kind`` workers of ``variants`` side by side, each in a process of its own (its peak memory
    its own) with a cold inductor cache: they start and compile one after the other, then time one call
    each in turn for ``rounds`` rounds, so that a slower or faster spell of the machine falls on every
    variant alike and the ratios between them hold. Returns per variant the first call, every timed call
    (``calls``), their :func:`steady` seconds, what the worker reported at the end and (distill) the
    live-memory worker's peak."""
    results = {}
    with contextlib.ExitStack() as stack:
        workers = {}
        for variant in variants:
            cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="sslkd-bench-inductor-"))
            errors = stack.enter_context(tempfile.TemporaryFile(mode="w+"))  # a file: a full pipe would block it
            worker = stack.enter_context(
                subprocess.Popen(
                    worker_command(args, kind, variant, syn_steps),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    text=True,
                    env=worker_env(cache, variant_malloc(kind, variant)),
                )
            )
            raw = {"first": reply(worker, errors, variant)["first"], "calls": []}
            workers[variant] = worker, errors, cache, raw
        for _ in range(rounds):
            for variant, (worker, errors, _, raw) in workers.items():
                worker.stdin.write("time\n")
                worker.stdin.flush()
                raw["calls"].append(reply(worker, errors, variant))
        for variant, (worker, errors, cache, raw) in workers.items():
            worker.stdin.close()
            raw.update(reply(worker, errors, variant))
            worker.wait()
            raw["steady"] = steady(raw["calls"])
            if kind == "distill":  # the live-memory worker, on the warm inductor cache
                raw.update(
                    run_worker(args, "distill_memory", variant, syn_steps, cache, LIVE_MEMORY_ENV)
                    if args.device == "cpu"
                    else {"peak_live_mb": raw["peak_mb"]}
                )
            results[variant] = raw
    return results


def summarise(basis: str, distill: dict, experts: dict | None, stage_images: int) -> tuple[dict, dict | None]:
    """The figures on one time basis (wall or cpu): s/iteration, GFLOP/s, compile seconds, images/s
    (experts: None when not measured)."""
    return matching_summary(basis, distill), None if experts is None else experts_summary(basis, experts, stage_images)


def table(results: dict) -> str:
    lines = [
        f"machine: {results['machine']}, {results['threads']} torch thread(s), torch {results['torch']}; "
        f"load average before / after: {results['load_before']} / {results['load_after']}",
        f"times: {results['time_basis']} seconds; dense matmul: {results['matmul_gflops']:.1f} GFLOP/s",
        "",
        *matching_table(results),
    ]
    if results["experts"] is not None:
        lines += ["", *experts_table(results)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda: the paper setting unless overridden)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu on CPU, paper on CUDA")
    for name in ("width", "depth", "batch", "size", "image-size", "dim", "iterations", "expert-batch", "expert-steps"):
        parser.add_argument(f"--{name}", type=int)
    parser.add_argument("--syn-steps", type=int, nargs="+")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated distill variants (default: all of %(default)s)"
    )
    parser.add_argument(
        "--distill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the distill variants (default: yes)",
    )
    parser.add_argument(
        "--experts",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure expert training, eager vs compiled, float32 and bfloat16 (default: yes)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
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
        allocator.keep_freed_memory()  # as the stages run: $SSLKD_MALLOC, from the driver
        args.syn_steps = args.syn_steps[0]
        print(json.dumps(WORKERS[args.worker](args, device)))
        return
    if args.out is None:
        parser.error("--out is required")
    variants = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or (args.distill and not variants):
        parser.error(f"unknown distill variants {unknown}; choose from {', '.join(VARIANTS)}")
    basis = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    matmul_gflop, matmul = matmul_seconds(device)
    _, matmul_bfloat16 = matmul_seconds(device, dtype=torch.bfloat16)
    by_steps = {
        str(n): run_interleaved(args, "distill", variants, n, args.iterations)
        for n in (args.syn_steps if args.distill else [])
    }
    distill = {
        variant: {n: results[variant] for n, results in by_steps.items()}
        for variant in (variants if args.distill else [])
    }
    experts = run_interleaved(args, "experts", list(EXPERT_VARIANTS), 0, args.expert_steps) if args.experts else None
    summary, experts_summary = summarise(
        basis, distill, experts and {**experts, "batch": args.expert_batch}, STAGE_IMAGES[preset]
    )
    results = {
        "machine": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(),
        "device": args.device,
        "torch": torch.__version__,
        "time_basis": basis,
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "preset": preset,
        "setting": {key: getattr(args, key) for key in PRESETS["cpu"]},
        "matmul_gflops": matmul_gflop / matmul[basis],
        "matmul_bfloat16_gflops": matmul_gflop / matmul_bfloat16[basis],
        "distill": summary,
        "experts": experts_summary,
        "raw": {"matmul_s": matmul, "matmul_bfloat16_s": matmul_bfloat16, "distill": distill, "experts": experts},
    }
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

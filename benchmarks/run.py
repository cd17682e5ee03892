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
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sslkd.infra import allocator  # noqa: E402
from sslkd.methods.experts import build_student  # noqa: E402
from sslkd.methods.kd_steps import KDSteps  # noqa: E402
from sslkd.methods.unroll import match_trajectory  # noqa: E402
from sslkd.models import ConvNetConfig, ParameterLayout  # noqa: E402

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


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the C++ compiler runs as a child)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def steady(calls: list[dict[str, float]]) -> dict[str, float]:
    """Seconds per call of timed calls ({"wall", "cpu"} each): the fastest wall-clock time (the call least
    disturbed by other load) and the median CPU time (with one thread, what a call costs whatever else runs)."""
    cpu = sorted(call["cpu"] for call in calls)
    return {"wall": min(call["wall"] for call in calls), "cpu": cpu[len(cpu) // 2]}


def timed(run, repeats: int, device: torch.device) -> dict[str, float]:
    """:func:`steady` seconds per call of ``repeats`` calls."""
    calls = []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), cpu_seconds()
        run()
        synchronize(device)
        calls.append({"wall": time.perf_counter() - began, "cpu": cpu_seconds() - began_cpu})
    return steady(calls)


def count_flops(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracking()
    with counter:
        run()
    return counter.get_total_flops()


def student_for(args: argparse.Namespace, device: torch.device):
    student = build_student(
        ConvNetConfig(args.width, args.depth), (3, args.image_size, args.image_size), args.dim, seed=0
    )
    return student.to(device), ParameterLayout.of(student)


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


def serve(call: Callable[[], None], device: torch.device) -> float:
    """Time ``call`` on the driver's demand, so that the variants' calls interleave: the first call (the
    compile) is timed and reported at once; then each ``time`` line on stdin times one more call and
    reports it, until stdin ends. Returns the memory in use after the first call (the baseline of the
    peak-memory window that starts there, :func:`reset_peak_memory`)."""
    print(json.dumps({"first": timed(call, 1, device)}), flush=True)
    baseline = reset_peak_memory(device)
    for line in sys.stdin:
        if line.strip() != "time":
            raise SystemExit(f"unknown request {line.strip()!r}")
        print(json.dumps(timed(call, 1, device)), flush=True)
    return baseline


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


def matmul_seconds(
    device: torch.device, size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> tuple[float, dict[str, float]]:
    """(GFLOP, seconds) of one dense matmul: the machine's practical limit for these workloads."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * size**3 / 1e9, timed(lambda: a @ b, repeats, device)


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


def paired_ratio(reference_calls: list[dict], calls: list[dict], basis: str) -> float:
    """The median over rounds of the reference's seconds over the variant's in the same round."""
    return statistics.median(reference[basis] / call[basis] for reference, call in zip(reference_calls, calls))


def summarise(basis: str, distill: dict, experts: dict | None, stage_images: int) -> tuple[dict, dict | None]:
    """The figures on one time basis (wall or cpu): s/iteration, GFLOP/s, compile seconds, images/s
    (experts: None when not measured)."""
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
    if experts is None:
        return summary, None
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
    return summary, figures


def table(results: dict) -> str:
    peak = results["matmul_gflops"]
    lines = [
        f"machine: {results['machine']}, {results['threads']} torch thread(s), torch {results['torch']}; "
        f"load average before / after: {results['load_before']} / {results['load_after']}",
        f"times: {results['time_basis']} seconds; dense matmul: {peak:.1f} GFLOP/s",
        "",
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
    e = results["experts"]
    if e is None:
        return "\n".join(lines)
    lines += [
        "",
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

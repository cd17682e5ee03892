"""How the benchmarks measure, inside a worker process (benchmarks/run.py starts one per variant): the wall
and CPU seconds of a call, peak memory, FLOPs, a call served on the driver's demand, the ratio of two variants
within a round, and the dense-matmul rate that says how close to the machine's limit a workload runs."""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import sys
import time
from typing import Callable

import torch

from sslkd.methods.experts import build_student
from sslkd.models import ConvNetConfig, ParameterLayout


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


def matmul_seconds(
    device: torch.device, size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32
) -> tuple[float, dict[str, float]]:
    """(GFLOP, seconds) of one dense matmul: the machine's practical limit for these workloads."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * size**3 / 1e9, timed(lambda: a @ b, repeats, device)


def paired_ratio(reference_calls: list[dict], calls: list[dict], basis: str) -> float:
    """The median over rounds of the reference's seconds over the variant's in the same round."""
    return statistics.median(reference[basis] / call[basis] for reference, call in zip(reference_calls, calls))

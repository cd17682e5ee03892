"""The stage processes' allocator setting (sslkd/infra/allocator.py): the choice and its checks, that it keeps
freed memory where glibc would give it back, that it leaves a tuned environment alone, and that it does
not change what is computed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sslkd.errors import SslkdError
from sslkd.infra import allocator

from conftest import REPO

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="mallopt is glibc's")

# Allocates, touches and frees a 64 MiB tensor after the allocator is set as a stage sets it; prints
# whether it was set and the RSS (MiB) before, with the tensor, and after it is freed.
RSS_PROBE = """
import json, torch
from sslkd.infra import allocator
def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024
kept = allocator.keep_freed_memory()
before = rss()
block = torch.ones(16 * 2**20)
held = rss()
del block
print(json.dumps({"kept": kept, "before": before, "held": held, "after": rss()}))
"""

# Three eager and three compiled KD training steps at the size where keeping memory matters (batch 256,
# width 32, 32×32: 32 MiB activations); prints the sha256 of each run's final parameters.
TRAINING_PROBE = """
import hashlib, torch
from sslkd.infra import allocator
from sslkd.methods.experts import build_student
from sslkd.methods.kd_steps import KDSteps
from sslkd.models import ConvNetConfig, ParameterLayout
allocator.keep_freed_memory()
torch.set_num_threads(1)
generator = torch.Generator().manual_seed(0)
images, targets = torch.randn(256, 3, 32, 32, generator=generator), torch.randn(256, 16, generator=generator)
student = build_student(ConvNetConfig(width=32, depth=3), (3, 32, 32), 16, seed=0)
layout = ParameterLayout.of(student)
digests = []
for compiled in (False, True):
    steps = KDSteps(student, layout, compile=compiled)
    parameters = layout.flatten(student)
    velocity = torch.zeros_like(parameters)
    for _ in range(3):
        parameters, velocity, _ = steps.train_step(parameters, velocity, images, targets, torch.tensor(0.05), 0.9, 5e-4)
    digests.append(hashlib.sha256(parameters.numpy().tobytes()).hexdigest())
print(" ".join(digests))
"""


def run_probe(code: str, tmp_path, **env: str) -> str:
    environ = {key: value for key, value in os.environ.items() if allocator.tuned_elsewhere({key: value}) is None}
    environ.update(env, PYTHONPATH=str(REPO), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_the_choice_defaults_to_keep_and_refuses_unknown_names(monkeypatch):
    monkeypatch.delenv(allocator.MALLOC_ENV, raising=False)
    assert allocator.chosen_malloc() == "keep"
    monkeypatch.setenv(allocator.MALLOC_ENV, " System ")
    assert allocator.chosen_malloc() == "system"
    monkeypatch.setenv(allocator.MALLOC_ENV, "jemalloc")
    with pytest.raises(SslkdError, match="SSLKD_MALLOC='jemalloc' is not one of keep, system"):
        allocator.chosen_malloc()


def test_an_unknown_choice_fails_the_stage_in_one_line(tmp_path, monkeypatch, capsys):
    from sslkd.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv(allocator.MALLOC_ENV, "tcmalloc")
    assert main(["data"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sslkd data: error: SSLKD_MALLOC='tcmalloc' is not one of keep, system"]
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize(
    "variable, value, tuned",
    [
        ("MALLOC_MMAP_THRESHOLD_", "131072", True),
        ("MALLOC_ARENA_MAX", "2", False),  # the number of arenas: none of what keep sets
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0", True),
        ("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX2", False),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", True),
        ("LD_PRELOAD", "/usr/lib/libtcmalloc_minimal.so.4", True),
        ("LD_PRELOAD", "/opt/libfaketime.so", False),
    ],
)
def test_an_allocator_tuned_by_the_environment_is_recognised(variable, value, tuned):
    assert allocator.tuned_elsewhere({"PATH": "/bin", variable: value}) == (variable if tuned else None)


@pytest.mark.slow
@glibc_only
def test_keep_holds_freed_memory_that_glibc_gives_back(tmp_path):
    kept = json.loads(run_probe(RSS_PROBE, tmp_path, SSLKD_MALLOC="keep"))
    system = json.loads(run_probe(RSS_PROBE, tmp_path, SSLKD_MALLOC="system"))
    tuned = json.loads(run_probe(RSS_PROBE, tmp_path, SSLKD_MALLOC="keep", MALLOC_MMAP_THRESHOLD_=str(2**17)))
    for probe in (kept, system, tuned):
        assert probe["held"] - probe["before"] > 60  # the 64 MiB block was touched
    assert kept["kept"] and kept["held"] - kept["after"] < 4  # freed, and its pages kept for the next step
    assert not system["kept"] and system["held"] - system["after"] > 60  # unmapped at once
    assert not tuned["kept"] and tuned["held"] - tuned["after"] > 60  # the environment's setting stands


@pytest.mark.slow
@glibc_only
def test_keeping_freed_memory_computes_the_same_bits(tmp_path):
    """Eager and compiled KD training steps give bit-identical parameters with either allocator."""
    kept = run_probe(TRAINING_PROBE, tmp_path, SSLKD_MALLOC="keep")
    system = run_probe(TRAINING_PROBE, tmp_path, SSLKD_MALLOC="system")
    assert kept == system and len(kept.split()) == 2

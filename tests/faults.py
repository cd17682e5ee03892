"""Helpers of the fault-injection suite (tests/test_faults_*.py): run the real command, read its stderr."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO

# A record of the CLI's logging (sslkd/cli.py's format); every other line on stderr is the error's.
LOG_RECORD = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) \S+: ")


def error_lines(stderr: str) -> list[str]:
    """What a command wrote to stderr besides its log records."""
    return [line for line in stderr.splitlines() if line.strip() and not LOG_RECORD.match(line)]


def assert_one_line_error(code: int, stderr: str, stage: str, *fragments: str) -> str:
    """Exit 2, exactly one non-log line on stderr, ``sslkd <stage>: error: ...`` holding ``fragments``."""
    lines = error_lines(stderr)
    assert code == 2, f"exit {code}, stderr:\n{stderr[-3000:]}"
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n" + "\n".join(lines[:40])
    assert lines[0].startswith(f"sslkd {stage.split()[0]}: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def file_size_limit(size: int):
    """A preexec_fn: files the child writes may not grow past ``size`` bytes (RLIMIT_FSIZE), and a write
    past it fails with EFBIG instead of killing the child with SIGXFSZ: a full disk, without root."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def sslkd(
    cwd: Path, *argv: str, env: dict[str, str] | None = None, preexec_fn=None, pythonpath: Path = REPO
) -> subprocess.CompletedProcess:
    """The real ``sslkd`` command (``python -m sslkd``) in ``cwd``, running the package at ``pythonpath``."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(pythonpath),
        "SSLKD_TRACKING": "off",
        "SSLKD_DEVICE": "cpu",
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "sslkd", *argv],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        preexec_fn=preexec_fn,
        timeout=600,
    )

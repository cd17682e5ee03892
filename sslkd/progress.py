"""Progress of the long loops (teacher epochs, experts, distillation iterations, pre-training runs).

On a terminal, a tqdm bar. Without one (under DVC, SLURM, ``docker run`` without ``-t``, a pipe), tqdm
would print nothing useful, so the same tqdm object writes one log line (logger ``sslkd.progress``, INFO)
at most every ``SSLKD_PROGRESS_SECONDS`` (default 30) while the loop advances, and one when it ends
(a loop shorter than that logs nothing):
``distill: 120/5000 (2%) 1.52it/s, ETA 53:21, elapsed 01:19, loss=0.1234``. The loop sets its loss
with tqdm's ``set_postfix`` as before.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import std
from tqdm.auto import tqdm

from sslkd.errors import SslkdError

log = logging.getLogger(__name__)

PERIOD_ENV = "SSLKD_PROGRESS_SECONDS"
DEFAULT_PERIOD_S = 30.0
LOG_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) {rate_fmt}, ETA {remaining}, elapsed {elapsed}{postfix}"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {rate_fmt}, elapsed {elapsed}{postfix}"

T = TypeVar("T")


class _LogLines:
    """A file for tqdm that logs each status line written to it."""

    def write(self, text: str) -> None:
        line = " ".join(text.replace("\x1b[A", "").split())
        if line:
            log.info(line)

    def flush(self) -> None:
        pass


class _LoggedProgress(std.tqdm):
    """tqdm writing to :class:`_LogLines`: a new postfix (the loss) waits for the next line, and a loop
    shorter than one period (or not yet one step in) writes none."""

    def display(self, msg=None, pos=None) -> bool:
        if self.n == 0 or self._time() - self.start_t < self.mininterval:
            return True
        return super().display(msg, pos)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)


def period_s() -> float:
    """Seconds between two progress log lines (``SSLKD_PROGRESS_SECONDS``)."""
    raw = os.environ.get(PERIOD_ENV, str(DEFAULT_PERIOD_S))
    try:
        period = float(raw)
    except ValueError:
        period = -1.0
    if not period > 0:
        raise SslkdError(f"{PERIOD_ENV}={raw!r}: give a number of seconds > 0")
    return period


def _no_stop_check() -> None:
    pass


_stop_check: Callable[[], None] = _no_stop_check


def check_stops_with(check: Callable[[], None]) -> None:
    """Have every step of a tracked loop call ``check``, which raises to stop the loop. The command line and a
    launcher's job install sslkd/infra/termination.py's ``raise_if_requested`` before any stage runs: the
    ground of the package knows no signals (docs/architecture.md)."""
    global _stop_check
    _stop_check = check


def stoppable(iterable: Iterable[T]) -> Iterator[T]:
    """``iterable``, raising a pending stop request (SIGTERM, SIGHUP, a lost launcher) before each item:
    the check :func:`check_stops_with` installed."""
    for item in iterable:
        _stop_check()
        yield item


def track(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> tqdm:
    """``tqdm(iterable)``: a bar on a terminal (stderr), else log lines at a steady rhythm; a stop request
    pending at a step is raised there (:func:`stoppable`)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty():
        return tqdm(stoppable(iterable), desc=desc, total=total, leave=leave)
    return _LoggedProgress(
        stoppable(iterable),
        desc=desc,
        total=total,
        file=_LogLines(),
        mininterval=period_s(),
        miniters=1,
        leave=True,
        bar_format=LOG_FORMAT if total is not None else LOG_FORMAT_NO_TOTAL,
    )

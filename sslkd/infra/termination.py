"""No stage outlives the command that ran it.

``dvc repro``, SLURM and most job runners stop a command with SIGTERM (a closed terminal: SIGHUP), and
DVC does not pass the signal on to the stage it runs: the stage used to keep running with ppid 1 and
write its artifacts behind DVC's back. So every ``sslkd`` process

- turns SIGTERM and SIGHUP into :class:`Terminated` (a SystemExit: ``finally`` blocks run, the atomic
  writes of sslkd/store/artifacts.py remove their temporary file, the tracking run ends KILLED), and keeps the
  request: every step of a long loop (sslkd/progress.py) raises it again (:func:`raise_if_requested`),
  so a Terminated lost where Python drops exceptions (a ``__del__``, a weakref callback) or a library's
  broad ``except`` cannot leave the stage training on, and
- asks the kernel to send it SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), whatever
  killed the parent (SIGTERM, SIGKILL, a crash); a parent that died before the request was made shows
  as a parent that changed since this module was imported (read then, early in start-up): pid 1 as the
  parent is no such sign, it is the real parent in a container (``docker build``'s ``RUN`` shell,
  ``docker run``'s entry point, tini) and under systemd, and
- when that parent is a shell running one command line (DVC with no $SHELL runs ``/bin/sh -c CMD``, and
  dash does not exec CMD), also ends when the shell loses its own parent (DVC).

A launcher's job (sslkd/stage_job.py) also watches the process that launched it (:func:`exit_with`).
A process started with SIGHUP ignored (``nohup sslkd teacher &``) was asked to outlive its terminal: it
keeps SIGHUP ignored and does not ask for the parent-death signal.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

# (this process, its parent) when this module was first imported: every ``sslkd`` command imports it
# while starting, before it imports torch or does any work (:func:`reparented`)
STARTED_UNDER = (os.getpid(), os.getppid())

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM or SIGHUP; exit code 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_requested: int | None = None  # the signal that asked this process to stop, once one has


def raise_terminated(signum: int, frame) -> None:
    global _requested
    _requested = signum
    raise Terminated(signum)


def raise_if_requested() -> None:
    """Raise :class:`Terminated` again when a stop was asked for: the exception the signal raised can be
    lost (Python drops one raised inside a ``__del__``), the request is not."""
    if _requested is not None:
        raise Terminated(_requested)


def clear_request() -> None:
    """Forget a stop request (an in-process caller of ``sslkd.cli.main`` that handled it)."""
    global _requested
    _requested = None


def nohup() -> bool:
    """Whether this process was started with SIGHUP ignored (nohup)."""
    return signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def handle_termination() -> None:
    """Turn SIGTERM and SIGHUP (unless ignored: nohup) into :class:`Terminated` (main thread only, as
    Python requires)."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            if not (signum == signal.SIGHUP and nohup()):
                signal.signal(signum, raise_terminated)


SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "busybox"})


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (Linux /proc), None when it is gone."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])


def is_command_shell(pid: int) -> bool:
    """Whether process ``pid`` is a shell running one command line (``sh -c CMD``): how DVC (with no
    $SHELL), make and ``subprocess(shell=True)`` start a command. dash does not exec that command, so the
    shell, not DVC, is the stage's parent, and it outlives DVC."""
    try:
        argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0].decode(errors="replace")).lstrip("-") in SHELLS and b"-c" in argv


def reparented(started_under: tuple[int, int] = STARTED_UNDER) -> bool:
    """Whether this process's parent is no longer the one it had at ``started_under`` (pid, parent pid):
    the parent died and the kernel gave the process to an init (pid 1 or a subreaper). Only a change is
    evidence: pid 1 can be the parent from the start. A reading taken in another process (before a fork)
    tells nothing about this one."""
    pid, parent = started_under
    return pid == os.getpid() and os.getppid() != parent


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies; returns whether it could
    (Linux only). A parent that died before the request leaves no signal to come: then exit now
    (:func:`reparented`). A parent that is a command shell (:func:`is_command_shell`) is looked through:
    the process also ends when the shell loses its own parent (:func:`exit_when_orphaned`)."""
    if not sys.platform.startswith("linux") or nohup():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    parent = os.getppid()  # read after the request: a parent that dies from now on sends the signal
    if reparented():
        os.kill(os.getpid(), signum)
    elif is_command_shell(parent) and (launcher := parent_pid(parent)) not in (None, 0, 1):
        # 0: the shell is a PID namespace's init (a container's), it has no parent to lose
        exit_when_orphaned(parent, launcher)
    return True


def stop_main_thread(reason: str, *args: object) -> None:
    """End this process as if SIGTERM had reached it (:class:`Terminated` in the main thread; its handler,
    :func:`raise_terminated`, keeps the request)."""
    log.warning(reason, *args)
    main_thread = threading.main_thread().ident
    if main_thread is not None:
        signal.pthread_kill(main_thread, signal.SIGTERM)


def watch_until(gone: Callable[[], bool], reason: str, *args: object, period_s: float = 1.0) -> None:
    """From a daemon thread, poll ``gone`` every ``period_s``; once true, :func:`stop_main_thread`."""

    def watch() -> None:
        while not gone():
            time.sleep(period_s)
        stop_main_thread(reason, *args)

    threading.Thread(target=watch, name="sslkd-exit-watch", daemon=True).start()


def exit_when_orphaned(shell: int, launcher: int, period_s: float = 1.0) -> None:
    """End this process once the command shell ``shell`` (its parent) is no longer the child of
    ``launcher``: the launcher died and the shell was reparented (a pid reused later cannot fool it)."""
    watch_until(
        lambda: parent_pid(shell) != launcher,
        "the process that launched this stage's shell (pid %d) is gone: stopping",
        launcher,
        period_s=period_s,
    )


def exit_with(pid: int, period_s: float = 1.0) -> None:
    """Watch process ``pid`` from a daemon thread; when it is gone, end this process as if SIGTERM had
    reached it (:class:`Terminated` in the main thread). For a job whose launching process is not its
    parent (submitit's local jobs run under a shell and a controller)."""

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's (cannot be ours: pid reused)
            return True
        return False

    watch_until(gone, "the process that launched this job (pid %d) is gone: stopping", pid, period_s=period_s)

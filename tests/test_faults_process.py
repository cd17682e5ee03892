"""Fault injection, processes and signals (docs/reliability.md): no stage outlives the command that ran
it, and a stopped stage leaves no artifact. Real processes, real signals, bounded waits."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_study, make_workspace

LONG_TEACHER = "\nsslkd.ssl.epochs = 100000  # a teacher that trains until it is stopped\n"


def environment(root: Path) -> dict[str, str]:
    return {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONPATH": str(REPO),
        "SSLKD_TRACKING": "off",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


def children() -> dict[int, list[int]]:
    """ppid -> pids of every process now."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


EPOCH_LINE = re.compile(r"teacher epoch \d+: ")


def excerpt(log: Path) -> str:
    """The log without its per-epoch lines (all but the last five), which would hide how it started and
    whether a stop was asked for."""
    lines = log.read_text().splitlines()
    kept = [line for line in lines[:-5] if not EPOCH_LINE.search(line)] + lines[-5:]
    return "\n".join(kept)[-4000:]


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s" + (f"; log:\n{excerpt(log)}" if log else ""))


def training_teacher(parent: int, marker: str, log: Path) -> int:
    """The pid of the descendant of ``parent`` running ``marker`` once its teacher is training."""

    def find():
        if "teacher epochs" not in log.read_text() and "sslkd teacher (setting" not in log.read_text():
            return None
        return next((pid for pid in descendants(parent) if marker in command_line(pid)), None)

    return wait_for(find, 120, f"a {marker!r} process under pid {parent}", log)


@pytest.fixture
def long_study(tmp_path):
    """The toy study as a git + DVC repository whose teacher trains until stopped; data already made."""
    root = copy_study(tmp_path / "study")
    with open(root / "gin" / "settings" / "tiny.gin", "a") as tiny:
        tiny.write(LONG_TEACHER)
    subprocess.run(["sslkd", "data"], cwd=root, env=environment(root), check=True, capture_output=True)
    return root


def stop(process: subprocess.Popen, *others: int) -> None:
    """SIGKILL what a test started (its own session) and the processes ``others``, if still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    for pid in others:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("shell", [None, "/bin/bash"])
def test_sigterm_to_dvc_repro_stops_the_stage_and_writes_no_artifact(long_study, shell):
    """DVC runs a stage as ``$SHELL -c CMD``, or ``/bin/sh -c CMD`` with no $SHELL (CI); bash execs CMD,
    dash keeps it as its child and outlives DVC: the stage must stop either way."""
    log = long_study / "repro.log"
    env = {key: value for key, value in environment(long_study).items() if key != "SHELL"}
    with open(log, "w") as out:
        dvc = subprocess.Popen(
            ["dvc", "repro", "-f", "-s", "teacher"],
            cwd=long_study,
            env=env | ({"SHELL": shell} if shell else {}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    teacher = 0
    try:
        teacher = training_teacher(dvc.pid, "sslkd teacher", log)
        time.sleep(1.0)
        dvc.send_signal(signal.SIGTERM)
        assert dvc.wait(timeout=30) != 0
        wait_for(lambda: not alive(teacher), 20, f"sslkd teacher (pid {teacher}) gone after dvc's SIGTERM", log)
        time.sleep(1.0)
        assert not list((long_study / "artifacts").glob("teacher/*"))
    finally:
        stop(dvc, teacher)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_stage_says_so_in_one_line_and_exits_at_once(long_study, signum):
    log = long_study / "teacher.log"
    with open(log, "w") as out:
        stage = subprocess.Popen(
            ["sslkd", "teacher"],
            cwd=long_study,
            env=environment(long_study),
            stderr=out,
            text=True,
            start_new_session=True,
        )
    try:
        # the signal once the teacher trains (its handlers are set before any work; a fixed sleep was too
        # short for start-up on a loaded machine, and the default action killed it before the handlers)
        wait_for(lambda: "teacher epochs" in log.read_text() or "teacher epoch 1" in log.read_text(), 120, "training")
        stage.send_signal(signum)
        stage.wait(timeout=15)
        err = log.read_text()
        assert stage.returncode == 128 + signum
        name = signal.Signals(signum).name
        assert f"sslkd teacher: stopped by {name} before it finished" in err.strip().splitlines()[-1]
        assert "Traceback" not in err
        assert not list((long_study / "artifacts").glob("teacher/*"))
    finally:
        stop(stage)


@pytest.mark.slow
@pytest.mark.parametrize("nohup", [False, True])
def test_a_stage_dies_with_its_parent_even_when_the_parent_is_sigkilled(long_study, nohup):
    """A shell that does not exec the stage (``; true``) keeps it as its child; SIGKILL leaves no handler
    to run in the parent: the kernel's parent-death signal stops the stage. Unless it was started with
    SIGHUP ignored (nohup): then it was asked to outlive its parent, and does."""
    log = long_study / "shell.log"
    script = ("trap '' HUP; " if nohup else "") + "sslkd teacher; true"
    with open(log, "w") as out:
        shell = subprocess.Popen(
            ["bash", "-c", script],
            cwd=long_study,
            env=environment(long_study),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    teacher = training_teacher(shell.pid, "sslkd teacher", log)
    try:
        shell.send_signal(signal.SIGKILL)
        shell.wait(timeout=10)
        if nohup:
            time.sleep(5)
            assert alive(teacher), "a nohup'ed stage stopped with its parent"
        else:
            wait_for(
                lambda: not alive(teacher), 10, f"sslkd teacher (pid {teacher}) gone after its shell's SIGKILL", log
            )
    finally:
        stop(shell, teacher)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_local_launcher_job_ends_with_the_command_that_launched_it(tmp_path, signum):
    root = make_workspace(tmp_path)
    with open(root / "gin" / "settings" / "tiny.gin", "a") as tiny:
        tiny.write(LONG_TEACHER)
    env = environment(root)
    subprocess.run(["sslkd", "data"], cwd=root, env=env, check=True, capture_output=True)
    log = root / "launch.log"
    with open(log, "w") as out:
        command = subprocess.Popen(
            ["sslkd", "teacher", "--launcher", "local"],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    jobs: list[int] = []
    try:

        def job():
            found = [pid for pid in descendants(command.pid) if "submitit" in command_line(pid)]
            return found if found and list((root / "jobs" / "teacher").rglob("*_log.err")) else None

        jobs += wait_for(job, 120, "the local job's processes", log)
        time.sleep(8)  # the job imports torch and starts training
        command.send_signal(signum)
        command.wait(timeout=30)
        for pid in jobs:
            wait_for(lambda: not alive(pid), 15, f"job process {pid} ({command_line(pid)}) gone", log)
        assert not (root / "artifacts" / "teacher").exists()
    finally:
        stop(command, *jobs)


def test_a_stage_whose_parent_dies_before_it_asks_for_the_signal_stops(tmp_path):
    """The parent dies after the stage started but before it asked for the parent-death signal, which then
    never comes: the change of parent since start-up (sslkd/infra/termination.py) stops it."""
    started, go, survived = tmp_path / "started", tmp_path / "go", tmp_path / "survived"
    stage = (
        "import pathlib, time; from sslkd.infra import termination; "
        f"pathlib.Path({str(started)!r}).touch(); "
        f"[time.sleep(0.1) for _ in range(600) if not pathlib.Path({str(go)!r}).exists()]; "
        f"termination.die_with_parent(); time.sleep(2); pathlib.Path({str(survived)!r}).touch()"
    )
    shell = subprocess.Popen(  # `; true`: the shell keeps the stage as its child
        ["bash", "-c", f"{shlex.quote(sys.executable)} -c {shlex.quote(stage)}; true"],
        env=environment(tmp_path),
        start_new_session=True,
    )
    try:
        wait_for(started.exists, 60, "the stage's start")
        shell.kill()  # the stage is reparented
        shell.wait(timeout=10)
        go.touch()
        time.sleep(6)
        assert not survived.exists(), "a stage whose parent died during its start-up kept running"
    finally:
        stop(shell)


def pid_namespaces_work() -> bool:
    """Whether this user may make a PID namespace (root may; CI runs as root)."""
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not pid_namespaces_work(), reason="cannot make a PID namespace (unshare needs root)")
@pytest.mark.parametrize("command", ["sslkd --help > /dev/null", "sslkd data"])
def test_a_stage_whose_parent_is_pid_1_from_the_start_runs(tmp_path, command):
    """In a container pid 1 is the real parent: docker build's RUN shell, the image's entry point, tini.
    A PID namespace makes the shell pid 1 without Docker; the ``; exit`` keeps sslkd its child (no exec).
    `sslkd data` on the shipped params.yaml (the embedded digits setting) is a short real stage."""
    shutil.copytree(REPO / "gin", tmp_path / "gin")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    script = f'echo "shell pid $$"; {command}; exit $?'
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", script],
        cwd=tmp_path,
        env=environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.startswith("shell pid 1\n"), result.stdout  # the shell, sslkd's parent, is pid 1
    assert result.returncode == 0, result.stderr[-3000:]
    if command == "sslkd data":
        assert list((tmp_path / "artifacts" / "data").glob("*.pt")), sorted(tmp_path.rglob("*"))


# The pipeline under DVC: a bad sweep value, and the status of a finished run.


def dvc(root: Path, *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *command], cwd=root, env=environment(root), capture_output=True, text=True)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under artifacts/ and results/ -> its bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for folder in ("artifacts", "results")
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """The toy study after a successful default `dvc repro`, its dvc.lock committed."""
    root = copy_study(tmp_path_factory.mktemp("reproduced"))
    result = dvc(root, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "-A"], cwd=root, check=True, capture_output=True)
    subprocess.run(git + ["commit", "-qm", "repro"], cwd=root, check=True, capture_output=True)
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "value, error",
    [
        ("setting=nope", "unknown setting 'nope'"),
        ("+teacher.epochs_typo=1", "epochs_typo"),
    ],
)
def test_a_bad_value_in_dvc_exp_run_stops_before_any_output_is_deleted(reproduced, value, error):
    before = snapshot(reproduced)
    result = dvc(reproduced, "exp", "run", "-S", value)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("sslkd ")]
    assert len(lines) == 1 and lines[0].startswith("sslkd check: error:") and error in lines[0], lines
    assert snapshot(reproduced) == before, "an output was deleted or changed"
    # What DVC itself does (measured, DVC 3.67): it wrote the value into params.yaml and leaves it there.
    assert (reproduced / "params.yaml").read_text() != subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=reproduced, capture_output=True, text=True
    ).stdout
    # The recovery of docs/reliability.md: restore params.yaml; nothing needs to run again.
    subprocess.run(["git", "checkout", "params.yaml"], cwd=reproduced, check=True)
    status = dvc(reproduced, "status", "dvc.yaml")
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout


@pytest.mark.slow
def test_after_a_default_repro_only_the_separate_study_is_not_up_to_date(reproduced):
    """`dvc status` reads every dvc.yaml, the variance study's too (never run by `dvc repro`);
    `dvc status dvc.yaml` is the default pipeline's (docs/reliability.md)."""
    status = dvc(reproduced, "status", "dvc.yaml")
    assert status.returncode == 0 and "Data and pipelines are up to date." in status.stdout, status.stdout
    everything = dvc(reproduced, "status", "--json")
    import json

    assert set(json.loads(everything.stdout)) == {"studies/variance/dvc.yaml:variance"}, everything.stdout


# Silence: a long stage without a terminal logs its progress at a steady rhythm.


@pytest.mark.slow
def test_a_stage_without_a_terminal_logs_its_progress_rate_and_eta(long_study):
    """The teacher (trained until stopped) with stderr to a pipe: progress lines at the period."""
    env = {**environment(long_study), "SSLKD_PROGRESS_SECONDS": "0.5"}
    stage = subprocess.Popen(
        ["sslkd", "teacher"],
        cwd=long_study,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pattern = re.compile(
        r"sslkd\.progress: teacher epochs: (\d+)/100000 \(\d+%\) +[\d.]+(?:it/s|s/it), "
        r"ETA [\d:?]+, elapsed [\d:]+"
    )
    steps: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while not steps and time.monotonic() < deadline:  # an epoch can take minutes on a loaded machine
            line = stage.stderr.readline()
            if not line:
                break
            if match := pattern.search(line):
                steps.append(int(match.group(1)))
    finally:
        stop(stage)
    assert steps and steps[0] >= 1, steps  # the rhythm itself: test_progress_lines_come_at_the_period_...


def test_progress_lines_come_at_the_period_and_a_short_loop_is_silent(monkeypatch, caplog):
    from sslkd.progress import track

    monkeypatch.setenv("SSLKD_PROGRESS_SECONDS", "0.2")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    caplog.set_level("INFO", logger="sslkd.progress")
    for _ in track(range(3), desc="short"):
        pass
    assert not caplog.records
    loop = track(range(12), desc="long")
    for step in loop:
        time.sleep(0.05)
        loop.set_postfix(loss=f"{1 / (step + 1):.3f}")
    messages = [record.getMessage() for record in caplog.records]
    assert 2 <= len(messages) <= 6, messages  # ~0.6 s of work at one line per 0.2 s, and the last
    assert messages[-1].startswith("long: 12/12 (100%)") and "ETA" in messages[-1] and "loss=0.083" in messages[-1]


class _DropsWhatItRaises:
    """Python drops an exception raised in ``__del__`` (it prints "Exception ignored"): a signal whose
    handler runs there is lost."""

    def __del__(self):
        from sslkd.infra import termination

        termination.raise_terminated(signal.SIGTERM, None)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped Terminated
def test_a_stop_request_lost_by_python_is_raised_at_the_next_loop_step():
    from sslkd.infra import termination
    from sslkd.progress import check_stops_with, track

    check_stops_with(termination.raise_if_requested)  # as sslkd.cli.main and a launcher's job do
    steps = []
    try:
        with pytest.raises(termination.Terminated) as stopped:
            for step in track(range(10), desc="loop"):
                steps.append(step)
                if step == 3:
                    _DropsWhatItRaises()  # collected at once: the Terminated it raises is dropped
        assert stopped.value.signum == signal.SIGTERM and stopped.value.code == 128 + signal.SIGTERM
        assert steps == [0, 1, 2, 3]
    finally:
        termination.clear_request()
    assert list(track(range(3), desc="after")) == [0, 1, 2]  # a cleared request stops nothing


def test_the_command_line_has_every_long_loop_raise_a_stop_request(tmp_path):
    """The library's loops know no signals (sslkd.progress is below sslkd.infra): sslkd.cli.main installs
    termination's check before it runs any command."""
    from sslkd.cli import main
    from sslkd.infra import termination
    from sslkd.progress import check_stops_with, track

    check_stops_with(lambda: None)  # what a library caller without the command line gets
    assert main(["check", "--params", str(tmp_path / "missing.yaml")]) == 2
    try:
        with pytest.raises(termination.Terminated):
            termination.raise_terminated(signal.SIGTERM, None)
        with pytest.raises(termination.Terminated):
            next(iter(track(range(3), desc="loop")))
    finally:
        termination.clear_request()


def test_check_validates_params_yaml_in_one_line_and_writes_only_when_valid(tmp_path, monkeypatch, capsys):
    from sslkd.cli import main

    root = make_workspace(tmp_path)
    monkeypatch.chdir(root)
    params = root / "params.yaml"
    good = params.read_text()
    for bad, error in [
        (good.replace("setting: tiny", "setting: nope"), "unknown setting 'nope'"),
        (good.replace("teacher:\n  seed: 0", "teacher:\n  seed: 0\n  sed: 1"), "sed"),
        (good + "distil:\n  seeds: [0]\n", "unknown section 'distil'"),
    ]:
        params.write_text(bad)
        assert main(["check"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sslkd check: error:") and error in err[0], err
        assert not (root / "artifacts").exists()
    params.write_text(good)
    assert main(["check"]) == 0
    assert (root / "artifacts" / "check" / "params.txt").read_text() == "setting: tiny\n"

"""Atomic artifact I/O: every artifact is a torch file plus a JSON metadata sidecar.

A write goes to a temporary file in the destination folder and is renamed into place, so a crash never
leaves a half-written artifact and never destroys the previous one; a failed write (full disk, read-only
folder) removes its temporary file and ends in one line. The sidecar (``<name>.meta.json``) records the
artifact kind, its sha256, shapes, the operative config, hashes of the inputs, the code version and the
device it was computed on; tensors are always saved on the CPU. A reader verifies the artifact against
its sidecar's sha256 before using it.

Sidecars are DVC outputs, so everything in them is a function of the payload, the config and the code:
the code version is a hash of the running stage's source files, exactly its DVC code deps
(:func:`sidecar_code_version`; the rule that picks them: sslkd/provenance.py), never the git work tree's
state (``git describe --dirty`` changes when DVC edits dvc.lock, when a commit only touches docs); the
git state goes to the stage's MLflow run (:func:`code_version`, sslkd/cli.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch

from sslkd import PACKAGE_DIR, __version__
from sslkd.errors import SslkdError
from sslkd.store import running_stage

_UMASK = os.umask(0)
os.umask(_UMASK)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


HASH_BLOCK = 4 << 20  # bytes read per step: the memory of hashing a many-GB artifact stays a few MiB


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    block = memoryview(bytearray(HASH_BLOCK))
    with open(path, "rb", buffering=0) as handle:
        while read := handle.readinto(block):
            digest.update(block[:read])
    return digest.hexdigest()


CODE_VERSION_STAMP = "CODE_VERSION"


def sources_digest(root: Path, sources: Iterable[Path]) -> str:
    """sha256 (hex) of ``sources`` in the order given, each as its path relative to ``root`` and its bytes."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.relative_to(root).as_posix().encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def source_digest() -> str:
    """sha256 of the package's Python sources (names and contents)."""
    return sources_digest(PACKAGE_DIR, sorted(PACKAGE_DIR.rglob("*.py")))


def _git(*arguments: str) -> str:
    """stdout of a git command in the package's repository (raises outside a repository). Without optional
    locks: ``describe --dirty`` would otherwise refresh the index under .git/index.lock, and a stage stopped
    (or a git timed out) meanwhile left that lock behind, failing the user's next ``git commit``."""
    return subprocess.run(
        ["git", "--no-optional-locks", *arguments],
        cwd=PACKAGE_DIR,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()


def git_commit() -> str | None:
    """The full commit hash of the package's repository, None outside one."""
    try:
        return _git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None


def source_version() -> str:
    """Package version and a hash of its sources: what artifact sidecars record as their code version.

    It depends only on the code (a code snapshot of sslkd.runner.launch has the same sources, hence the same
    value), so a rerun of the same code on the same inputs writes a byte-identical sidecar whatever the
    git work tree's state.
    """
    return f"{__version__}+src.{source_digest()[:12]}"


def sidecar_code_version() -> str:
    """What a sidecar records as its code version: ``<package version>+src.<12 hex>``, a sha256 of the running
    stage's source files, names and contents (sslkd/store/running_stage.py; outside a stage, as when a library
    function is called directly, :func:`source_version`)."""
    stage_sources = running_stage.sources()
    if stage_sources is None:
        return source_version()
    root = PACKAGE_DIR.parent  # the names are relative to the repository, as dvc.yaml lists them
    return f"{__version__}+src.{sources_digest(root, (root / source for source in stage_sources))[:12]}"


def code_version() -> str:
    """Package version, git commit (with ``-dirty`` when the tree differs) or a hash of the sources: the
    provenance of a run for tracking (volatile: never written into an artifact or sidecar).

    A code snapshot made for queued jobs (sslkd.runner.launch) carries the version of the tree it was copied
    from in a ``CODE_VERSION`` file, so its artifacts record the same version as an inline run.
    """
    stamp = PACKAGE_DIR / CODE_VERSION_STAMP
    if stamp.is_file():
        return stamp.read_text().strip()
    try:
        return f"{__version__}+git.{_git('describe', '--always', '--dirty', '--abbrev=12')}"
    except (OSError, subprocess.SubprocessError):
        return source_version()


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: itself, or one it was raised from or while handling (torch.save's
    zip writer reports a failed write as a RuntimeError raised while handling the OSError)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    return cause


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place.

    When the file system refuses (an OSError: ENOSPC, EFBIG, EROFS, EACCES, ...), the temporary file is
    removed, ``path`` is left as it was and the error is one line (SslkdError).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        cause = _os_error(error)
        if cause is None:
            raise
        raise SslkdError(
            f"cannot write {path}: {cause.strerror or cause}; nothing was written (free space or "
            f"make {path.parent} writable, then rerun)"
        ) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _torch_save(payload: Any, path: Path) -> None:
    # Through a file object, torch.save names the archive's records "archive/…" rather than after the
    # (random) temporary file name, so equal payloads give byte-identical files and equal sha256.
    with open(path, "wb") as handle:
        torch.save(payload, handle)


def torch_save_atomic(path: Path, payload: Any) -> None:
    atomic_write(path, lambda tmp: _torch_save(payload, tmp))


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {key: _describe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
        return [_describe(item) for item in value]
    return None


def on_cpu(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, lists, tuples) on the CPU: artifacts load anywhere."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(on_cpu(item) for item in value)
    return value


def _sidecar(
    path: Path, kind: str, shapes: dict, config: str, inputs: dict[str, Path] | None, extra: dict[str, Any] | None
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "kind": kind,
        "code_version": sidecar_code_version(),
        "shapes": shapes,
        "inputs": {name: {"path": str(p), "sha256": file_sha256(Path(p))} for name, p in (inputs or {}).items()},
        "operative_config": config,
        "device": running_stage.device(),
        **(extra or {}),
        "sha256": file_sha256(path),
    }
    write_json_atomic(sidecar_path(path), metadata)
    return metadata


def _sidecar_or_remove(path: Path, *args: Any) -> dict[str, Any]:
    """Write the sidecar of the artifact just written; if that fails, remove the artifact too (a reader
    would refuse it anyway): a failed stage leaves no output that looks finished."""
    try:
        return _sidecar(path, *args)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def save_artifact(
    path: Path,
    kind: str,
    payload: dict[str, Any],
    *,
    config: str = "",
    inputs: dict[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``payload`` (tensors and plain values) with ``torch.save`` and its sidecar, both atomically.

    The sidecar is written after the artifact; a reader trusts an artifact only with its sidecar.
    """
    path = Path(path)
    payload = on_cpu(payload)
    shapes = {key: desc for key, value in payload.items() if (desc := _describe(value)) is not None}
    torch_save_atomic(path, {"kind": kind, **payload})
    return _sidecar_or_remove(path, kind, shapes, config, inputs, extra)


def save_json_artifact(
    path: Path,
    kind: str,
    payload: dict[str, Any],
    *,
    config: str = "",
    inputs: dict[str, Path] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Like :func:`save_artifact` for results meant to be read by people and tools: JSON, plus sidecar."""
    path = Path(path)
    write_json_atomic(path, {"kind": kind, **payload})
    return _sidecar_or_remove(path, kind, {}, config, inputs, extra)


def verify_artifact(path: Path, kind: str, *, produced_by: str) -> dict[str, Any]:
    """Check ``path`` against its sidecar (present, readable, of ``kind``, same sha256); returns the sidecar.

    Every reader calls it before using an artifact: a corrupt, truncated or replaced file, or one without
    its sidecar, ends in one line that says which stage to rerun. Hashing reads the file once in
    HASH_BLOCK steps (about a second per GB).
    """
    path = Path(path)
    meta = sidecar_path(path)
    rerun = f"rerun `sslkd {produced_by}` (or `dvc repro`)"
    if not meta.is_file():
        raise SslkdError(f"{path} has no sidecar {meta.name}, so it cannot be verified: {rerun}")
    try:
        metadata = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SslkdError(f"cannot read the sidecar {meta} ({type(error).__name__}): {rerun}") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("sha256"), str):
        raise SslkdError(f"the sidecar {meta} records no sha256: {rerun}")
    if metadata.get("kind") != kind:
        raise SslkdError(
            f"the sidecar {meta} describes a {metadata.get('kind')!r} artifact, expected {kind!r}: {rerun}"
        )
    try:
        actual = file_sha256(path)
    except OSError as error:
        raise SslkdError(f"cannot read {path}: {error.strerror or error}") from None
    if actual != metadata["sha256"]:
        raise SslkdError(
            f"{path} does not match the sha256 in its sidecar (corrupt, truncated or changed since "
            f"it was written): {rerun}"
        )
    return metadata


def load_json_artifact(path: Path, kind: str, *, produced_by: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SslkdError(f"missing {kind} result {path}: run `sslkd {produced_by}` (or `dvc repro`) first")
    verify_artifact(path, kind, produced_by=produced_by)
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SslkdError(f"cannot read {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise SslkdError(f"{path} is not a {kind!r} result")
    return payload


def load_artifact(path: Path, kind: str, *, produced_by: str) -> dict[str, Any]:
    """Load an artifact written by :func:`save_artifact`, checking that it exists, matches its sidecar
    (:func:`verify_artifact`) and is of ``kind``.

    ``produced_by`` names the stage that makes it, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise SslkdError(f"missing {kind} artifact {path}: run `sslkd {produced_by}` (or `dvc repro`) first")
    verify_artifact(path, kind, produced_by=produced_by)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a corrupt file
        raise SslkdError(f"cannot read {path}: corrupt or not a torch file ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise SslkdError(f"{path} holds a {found!r} artifact, expected {kind!r}")
    return payload

"""Atomic artifact I/O: every artifact is a torch file plus a JSON metadata sidecar.

A write goes to a temporary file in the destination folder and is renamed into place, so a crash never
leaves a half-written artifact and never destroys the previous one. The sidecar (``<name>.meta.json``)
records the artifact kind, shapes, the operative config, hashes of the inputs, the code version and the
device it was computed on; tensors are always saved on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from sslkd import __version__
from sslkd.errors import SslkdError
from sslkd.infra.devices import stage_device_name

PACKAGE_DIR = Path(__file__).resolve().parent
_UMASK = os.umask(0)
os.umask(_UMASK)


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".meta.json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


CODE_VERSION_STAMP = "CODE_VERSION"


def source_digest() -> str:
    """sha256 of the package's Python sources (names and contents)."""
    digest = hashlib.sha256()
    for source in sorted(PACKAGE_DIR.rglob("*.py")):
        digest.update(str(source.relative_to(PACKAGE_DIR)).encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()


def _git(*arguments: str) -> str:
    """stdout of a git command in the package's repository (raises outside a repository)."""
    return subprocess.run(
        ["git", *arguments], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True,
    ).stdout.strip()


def git_commit() -> str | None:
    """The full commit hash of the package's repository, None outside one."""
    try:
        return _git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None


def code_version() -> str:
    """Package version, git commit (with ``-dirty`` when the tree differs) or a hash of the sources.

    A code snapshot made for queued jobs (sslkd.infra.launch) carries the version of the tree it was copied
    from in a ``CODE_VERSION`` file, so its artifacts record the same version as an inline run.
    """
    stamp = PACKAGE_DIR / CODE_VERSION_STAMP
    if stamp.is_file():
        return stamp.read_text().strip()
    try:
        return f"{__version__}+git.{_git('describe', '--always', '--dirty', '--abbrev=12')}"
    except (OSError, subprocess.SubprocessError):
        return f"{__version__}+src.{source_digest()[:12]}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
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


def _sidecar(path: Path, kind: str, shapes: dict, config: str, inputs: dict[str, Path] | None,
             extra: dict[str, Any] | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "kind": kind,
        "code_version": code_version(),
        "shapes": shapes,
        "inputs": {name: {"path": str(p), "sha256": file_sha256(Path(p))} for name, p in (inputs or {}).items()},
        "operative_config": config,
        "device": stage_device_name(),
        **(extra or {}),
        "sha256": file_sha256(path),
    }
    write_json_atomic(sidecar_path(path), metadata)
    return metadata


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
    return _sidecar(path, kind, shapes, config, inputs, extra)


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
    return _sidecar(path, kind, {}, config, inputs, extra)


def load_json_artifact(path: Path, kind: str, *, produced_by: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SslkdError(f"missing {kind} result {path}: run `sslkd {produced_by}` (or `dvc repro`) first")
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SslkdError(f"cannot read {path}: {error}") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        raise SslkdError(f"{path} is not a {kind!r} result")
    return payload


def load_artifact(path: Path, kind: str, *, produced_by: str) -> dict[str, Any]:
    """Load an artifact written by :func:`save_artifact`, checking that it exists and is of ``kind``.

    ``produced_by`` names the stage that makes it, for the error message.
    """
    path = Path(path)
    if not path.is_file():
        raise SslkdError(f"missing {kind} artifact {path}: run `sslkd {produced_by}` (or `dvc repro`) first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a corrupt file
        raise SslkdError(f"cannot read {path}: corrupt or not a torch file ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("kind") != kind:
        found = payload.get("kind") if isinstance(payload, dict) else type(payload).__name__
        raise SslkdError(f"{path} holds a {found!r} artifact, expected {kind!r}")
    return payload

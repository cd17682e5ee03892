"""What the sidecars of the stage this process runs record about how it runs, as the layers that run it tell
the store (which imports none of them, docs/architecture.md):

* the stage's source files, whose hash is its code version (set by sslkd/runner/registry.py from the rule
  in sslkd/provenance.py; None outside a stage, as when a library function is called directly), and
* the device it computes on (set by sslkd/infra/devices.py; ``cpu`` for stages that compute on none).

Plain values, no torch: sslkd/infra/devices.py imports this for every command.
"""

from __future__ import annotations

from collections.abc import Iterable

_sources: tuple[str, ...] | None = None
_device = "cpu"


def set_sources(sources: Iterable[str] | None) -> None:
    """The running stage's source files (paths relative to the repository), or None: no stage runs."""
    global _sources
    _sources = None if sources is None else tuple(sources)


def sources() -> tuple[str, ...] | None:
    return _sources


def set_device(name: str) -> None:
    """The device the running stage computes on, as a sidecar records it (``cpu``, ``cuda:0 (<GPU name>)``)."""
    global _device
    _device = name


def device() -> str:
    return _device

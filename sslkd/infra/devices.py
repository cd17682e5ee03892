"""Which device the stages compute on: ``sslkd <stage> --device cuda``, else ``$SSLKD_DEVICE``, else ``auto``
(the first CUDA device when there is one, else the CPU).

Like the launcher, the device is chosen outside every file DVC tracks: it changes where a stage runs,
not what it computes. Results agree across devices to float rounding, not bit for bit; on the CPU the
same configuration gives the same artifacts. Every random draw uses CPU generators (sslkd.seeding), so
data orders, augmentations and initialisations are the same on every device. Artifacts are always
written with CPU tensors, and their sidecars record the device.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

from sslkd.errors import SslkdError
from sslkd.store import running_stage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEVICE_ENV = "SSLKD_DEVICE"
_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_selected: str | None = None  # the command line's choice (select), else the environment's


def chosen_device(option: str | None) -> str:
    """The ``--device`` option, else $SSLKD_DEVICE, else ``auto``; checked for form (cpu, cuda, cuda:N, auto)."""
    name = (option or os.environ.get(DEVICE_ENV, "").strip() or "auto").lower()
    if not _DEVICE_NAME.match(name):
        raise SslkdError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return name


def select(option: str | None) -> str:
    """Make the command line's ``--device`` (else $SSLKD_DEVICE, else auto) the stage's; returns its name."""
    global _selected
    _selected = chosen_device(option)
    running_stage.set_device("cpu")  # until the stage resolves its device (stage_device)
    return _selected


def selected_device() -> str:
    """The name :func:`select` chose (else $SSLKD_DEVICE, else auto): what a launcher's job is told."""
    return _selected or chosen_device(None)


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (as :func:`chosen_device` returns it) stands for on this machine; asking
    for CUDA where there is none is an error, not a silent fallback."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SslkdError(f"device {name!r}: CUDA is not available on this machine (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SslkdError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def stage_device() -> torch.device:
    """The device the running stage computes on: the selected one (:func:`select`), resolved here."""
    import torch

    device = resolve_device(selected_device())
    running_stage.set_device(device_name(device))  # what its artifacts' sidecars record
    if device.type == "cuda":
        log.info("computing on %s (%s)", device, torch.cuda.get_device_name(device))
    else:
        log.info("computing on the CPU (%d threads)", torch.get_num_threads())
    return device


def device_name(device: torch.device) -> str:
    """What a sidecar records: ``cpu`` or ``cuda:<index> (<GPU name>)``."""
    import torch

    if device.type != "cuda":
        return "cpu"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"

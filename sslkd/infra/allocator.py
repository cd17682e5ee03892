"""The host-memory allocator of a stage process: glibc malloc set to keep freed memory for reuse.

With its defaults, glibc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB)
with a fresh ``mmap`` and unmaps it when freed. A training step allocates its activations, their
gradients and its workspaces anew each step — 32 MiB and a header a tensor for a width-32 layer at batch
256 on 32×32 images, over the threshold's maximum — so every step page-faults all of that memory in
again, serial kernel work. Keeping freed memory (no mmap, no trimming of the heap's top) turns those faults
into reuse of pages already mapped: an eager expert training step 1.60× and a compiled one 1.34× faster
on the 2-core CPU this package is tested on (README "Host memory", "Performance"). It does not change
what is computed: PyTorch aligns its CPU tensors itself (64 bytes) wherever the block comes from, and
the results are bit-identical (tests/test_allocator.py). What it costs: the process keeps its peak heap
size until it exits.

``SSLKD_MALLOC`` chooses: ``keep`` (the default) or ``system`` (glibc as configured by its environment).
A process whose environment already tunes malloc (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``) or preloads
another allocator (``LD_PRELOAD``, e.g. jemalloc or tcmalloc) keeps that choice. Elsewhere than glibc
(macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping

from sslkd.errors import SslkdError

log = logging.getLogger(__name__)

MALLOC_ENV = "SSLKD_MALLOC"
CHOICES = ("keep", "system")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_KEEP = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}  # no mmapped blocks; never trim the heap's top (2 GiB)


def chosen_malloc() -> str:
    """``$SSLKD_MALLOC`` (default ``keep``), checked."""
    choice = os.environ.get(MALLOC_ENV, "").strip().lower() or "keep"
    if choice not in CHOICES:
        raise SslkdError(f"{MALLOC_ENV}={choice!r} is not one of {', '.join(CHOICES)}")
    return choice


def tuned_elsewhere(environ: Mapping[str, str] = os.environ) -> str | None:
    """The environment variable that already configures this process's allocator, if any."""
    for name, value in environ.items():
        glibc_variable = name.startswith("MALLOC_") and name.endswith("_")
        glibc_tunable = name == "GLIBC_TUNABLES" and "malloc" in value
        preloaded = name == "LD_PRELOAD" and "alloc" in value
        if glibc_variable or glibc_tunable or preloaded:
            return name
    return None


def _glibc() -> ctypes.CDLL | None:
    """The C library this process runs on, if it is glibc."""
    try:
        libc = ctypes.CDLL(None)  # the process's global symbols, the C library's among them
        libc.gnu_get_libc_version  # noqa: B018 (raises AttributeError elsewhere than glibc)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Set glibc malloc to keep freed memory (module docstring) unless ``$SSLKD_MALLOC`` is ``system``,
    the environment tunes the allocator already, or this is not glibc. Returns whether it was set."""
    if chosen_malloc() == "system":
        return False
    if (variable := tuned_elsewhere()) is not None:
        log.debug("malloc left as %s configures it", variable)
        return False
    libc = _glibc()
    if libc is None:
        return False
    for parameter, value in _KEEP.items():
        if libc.mallopt(parameter, value) != 1:
            log.warning("mallopt(%d, %d) failed: freed memory is not (fully) kept", parameter, value)
            return False
    log.debug("malloc: keeping freed memory (%s=system for glibc's defaults)", MALLOC_ENV)
    return True

"""Whether any node of a SLURM partition can ever hold a stage's jobs.

SLURM accepts a job that asks for more CPUs than any node of its partition has and leaves it pending
forever (reason PartitionConfig; sbatch refuses only too much memory or unknown GPUs). Its pending
reasons cannot tell that apart from a wait: ``Resources`` also means "the nodes are busy". The nodes'
own sizes can: when no node of the partition has the CPUs, memory and GPUs a job asks for, it will never
start, whatever else runs. The sizes are the configured ones (``sinfo``), which hold also for nodes that
are down, drained or powered off, so a node that is merely unavailable never makes a request impossible.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass

from sslkd.infra.launchers import SlurmConfig

log = logging.getLogger(__name__)

SINFO = ["sinfo", "--noheader", "--Node", "--format=%N|%c|%m|%G|%P"]
GPU_GRES = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")  # gpu:4, gpu:a100:4(S:0-1), ...,gpu:2


@dataclass(frozen=True)
class Node:
    """One node of one partition, as configured: CPUs, memory (MB) and GPUs (gres gpu)."""

    name: str
    partition: str
    default_partition: bool
    cpus: int
    memory_mb: int
    gpus: int


def gpu_count(gres: str) -> int:
    """GPUs in a node's gres string ('gpu:a100:4(S:0-1),shard:8' -> 4; '(null)' -> 0)."""
    return sum(int(count) for count in GPU_GRES.findall(gres))


def parse_sinfo(text: str) -> list[Node]:
    """The rows of :data:`SINFO`'s output (one per node and partition); unreadable rows are left out."""
    nodes = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5:
            continue
        name, cpus, memory, gres, partition = fields
        try:
            size = int(cpus), int(memory.rstrip("+"))
        except ValueError:
            continue
        nodes.append(Node(name, partition.rstrip("*"), partition.endswith("*"), size[0], size[1], gpu_count(gres)))
    return nodes


def cluster_nodes() -> list[Node] | None:
    """Every node of every partition; None when SLURM cannot be asked right now (decide nothing then)."""
    try:
        result = subprocess.run(SINFO, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        log.debug("sinfo failed: %s", result.stderr.strip())
        return None
    return parse_sinfo(result.stdout)


def requested_partitions(resources: SlurmConfig) -> str:
    """The partition(s) sbatch will use for these resources ('' for the cluster's default): the same
    precedence as submitit's options over sbatch's $SBATCH_PARTITION."""
    explicit = resources.sbatch_options.get("partition") or resources.partition
    return str(explicit or os.environ.get("SBATCH_PARTITION", ""))


def in_partitions(nodes: list[Node], partitions: str) -> list[Node]:
    """The nodes of the comma-separated ``partitions`` ('': the default partition's)."""
    names = {name.strip() for name in partitions.split(",") if name.strip()}
    return [node for node in nodes if (node.partition in names if names else node.default_partition)]


def shortfalls(node: Node, resources: SlurmConfig) -> tuple[str, ...]:
    """The bindings of ``resources`` that ask for more than ``node`` has (mem_gb = 0: the cluster's
    default memory, which fits by definition)."""
    too_big = []
    if resources.cpus > node.cpus:
        too_big.append("cpus")
    if resources.mem_gb and resources.mem_gb * 1024 > node.memory_mb:
        too_big.append("mem_gb")
    if resources.gpus > node.gpus:
        too_big.append("gpus")
    return tuple(too_big)


def _amounts(cpus: int, memory_gb: float | None, gpus: int | None) -> str:
    parts = [f"{cpus} CPU{'s' * (cpus != 1)}"]
    if memory_gb is not None:
        parts.append(f"{memory_gb:g} GB")
    if gpus is not None:
        parts.append(f"{gpus} GPU{'s' * (gpus != 1)}")
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


def unsatisfiable(stage: str, resources: SlurmConfig, partitions: str, nodes: list[Node]) -> str | None:
    """One line naming the request and the largest node when no node of ``partitions`` can hold a job
    of ``resources``; None when one can, or when the partition has no node to compare with."""
    candidates = list({node.name: node for node in in_partitions(nodes, partitions)}.values())
    if not candidates or any(not shortfalls(node, resources) for node in candidates):
        return None
    # the largest node: the one short of the fewest bindings, then with the most CPUs, memory, GPUs
    largest = min(candidates, key=lambda n: (len(shortfalls(n, resources)), -n.cpus, -n.memory_mb, -n.gpus))
    asks_memory, asks_gpus = bool(resources.mem_gb), bool(resources.gpus)
    asked = _amounts(resources.cpus, resources.mem_gb if asks_memory else None, resources.gpus if asks_gpus else None)
    has = _amounts(
        largest.cpus,
        round(largest.memory_mb / 1024, 1) if asks_memory else None,
        largest.gpus if asks_gpus else None,
    )
    where = partitions or f"{largest.partition} (the default)"
    lower = " / ".join(shortfalls(largest, resources))
    return (
        f"{stage}: asked {asked} per job; the largest node of partition {where} has {has}: "
        f"lower sslkd.slurm.{lower} in gin/launch/slurm.gin"
    )

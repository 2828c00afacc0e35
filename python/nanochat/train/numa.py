"""NUMA pinning: read the node topology from sysfs and pin this process's threads to one node.

On multi-socket hosts, keeping the training threads and their memory on one node avoids remote
memory traffic. The topology is read from ``/sys/devices/system/node/node*/cpulist`` (the root is a
parameter so tests can use a fake tree).
"""

from __future__ import annotations

import os
from pathlib import Path

SYSFS_NODE_ROOT = Path("/sys/devices/system/node")


def parse_cpulist(text: str) -> list[int]:
    """Parse a kernel cpulist such as ``"0-3,8-11,16"`` into sorted CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            stride = 1
            if ":" in hi:  # "0-15:2" form
                hi, s = hi.split(":", 1)
                stride = int(s)
            cpus.update(range(int(lo), int(hi) + 1, stride))
        else:
            cpus.add(int(part))
    return sorted(cpus)


def numa_nodes(root: Path = SYSFS_NODE_ROOT) -> dict[int, list[int]]:
    """Map node id -> CPU ids; empty when the kernel exposes no NUMA information."""
    nodes: dict[int, list[int]] = {}
    if not root.is_dir():
        return nodes
    for d in sorted(root.glob("node[0-9]*")):
        f = d / "cpulist"
        if f.is_file():
            nodes[int(d.name[4:])] = parse_cpulist(f.read_text())
    return nodes


def pin_to_node(node: int, root: Path = SYSFS_NODE_ROOT) -> tuple[list[int], str]:
    """Pin the current process to ``node``'s CPUs. Returns (cpus, message).

    On a single-node machine this is a no-op with a message saying so; an unknown node raises.
    """
    nodes = numa_nodes(root)
    if len(nodes) <= 1:
        cpus = sorted(os.sched_getaffinity(0))
        return cpus, f"this machine has {len(nodes) or 1} NUMA node; --numa-node {node} changes nothing"
    if node not in nodes:
        raise ValueError(f"NUMA node {node} does not exist (nodes: {sorted(nodes)})")
    cpus = [c for c in nodes[node] if c in os.sched_getaffinity(0)] or nodes[node]
    os.sched_setaffinity(0, cpus)
    return cpus, f"pinned to NUMA node {node}: CPUs {cpus}"

"""cgroups for agents: the kernel creates one group per agent per controller; the agent joins it at boot."""
from __future__ import annotations

import os

from sandbox.policy import LayerUnavailable


def join(procs_files: list[str]) -> str:
    """Write this process's pid into each ``cgroup.procs`` file."""
    if not procs_files:
        raise LayerUnavailable("no cgroup for this agent (needs root and a memory/pids/cpu controller)")
    for path in procs_files:
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    return ", ".join(os.path.basename(os.path.dirname(os.path.dirname(p))) for p in procs_files)

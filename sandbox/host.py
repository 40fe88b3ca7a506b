"""The kernel's side of the sandbox: what must be prepared outside the agent before it starts, and undone after.

``Host.prepare`` builds an agent's ``Policy`` (and, where the kernel may, allocates its uid and creates its
cgroups); ``Host.release`` undoes that when the agent is reaped; ``Host.kill`` kills everything the agent
started, including processes that left its process group.  ``Host.capabilities`` says which layers this
machine and user can have, and why not, for operators.
"""
from __future__ import annotations

import os
from pathlib import Path

from sandbox import policy as policy_mod


class Host:
    def __init__(self, runtime_dir: Path, protected: list[str]):
        """``protected``: paths agents must never reach (model files, the state dir, the runtime dir)."""
        self.runtime_dir = Path(runtime_dir)
        self.protected = list(protected)
        self.root = os.geteuid() == 0

    def capabilities(self) -> dict[str, str]:
        return {}

    def prepare(self, agent_id: int, scratch: Path, limits: dict, *, allow_fork: bool = False) -> policy_mod.Policy:
        return policy_mod.build(str(scratch), limits, allow_fork=allow_fork)

    def release(self, agent_id: int) -> None:
        pass

    def kill(self, agent_id: int, pid: int) -> None:
        """SIGKILL the agent's process group (and, where the kernel has them, its cgroups)."""
        import signal
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

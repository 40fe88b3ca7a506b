"""seccomp syscall filter (placeholder until the layer is built)."""
from __future__ import annotations

from sandbox.policy import LayerUnavailable


def install(allow_fork: bool = False) -> str:
    raise LayerUnavailable("not built yet")

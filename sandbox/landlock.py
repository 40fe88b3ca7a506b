"""Landlock filesystem and network rules (placeholder until the layer is built)."""
from __future__ import annotations

from sandbox.policy import LayerUnavailable


def restrict(read: list[str], write: list[str]) -> str:
    raise LayerUnavailable("not built yet")

"""What every sandbox layer shares: the exception that says a layer cannot be had, and nothing else.

Each layer module (``cgroups``, ``namespaces``, ``rlimits``, ``landlock``, ``caps``, ``identity``, ``prctl``,
``seccomp``) exposes the same two entry points, as nsjail's layers do:

- ``available() -> str | None``: None when this machine and user can have the layer, else why not (shown to
  operators in the kernel's log and ``sys.status``);
- ``apply(policy) -> str``: apply the layer to this process from the fields of ``policy``
  (``sandbox.policy.Policy``, read by attribute) and return what was done, or raise :class:`LayerUnavailable`
  (or an ``OSError``) saying why not.

Layers import only this module and ``sandbox.linux``; ``sandbox.policy`` calls them in order, and no layer
imports it.
"""
from __future__ import annotations


class LayerUnavailable(Exception):
    """This machine or this user cannot have the layer; the message says why (shown to operators)."""


def off(reason: str):
    """Raise :class:`LayerUnavailable` (for one-line ``apply`` bodies)."""
    raise LayerUnavailable(reason)

"""Makes the official ``openai`` package reach the kernel, with no change to the agent's code (docs/sdk.md).

The bootstrap calls ``install()`` before the agent's program runs.  It costs almost nothing: it sets two
environment variables and puts an import hook first on ``sys.meta_path``; only when the program imports
``httpx`` or ``httpx2`` (the HTTP libraries openai is built on) does ``agentproc.openai_api`` load and mount its
transport on their clients.
"""
from __future__ import annotations

import os
import sys

HOST = "aiosd.invalid"  # never resolves: a client that bypassed the transport fails instead of reaching a network
BASE_URL = f"http://{HOST}/v1"
PLACEHOLDER_KEY = "aiosd-connection-identity"  # not a secret: the kernel knows the agent by its connection
HTTP_LIBRARIES = ("httpx", "httpx2")


def install() -> None:
    """Point openai at the kernel and hook the HTTP libraries' import (idempotent; imports neither)."""
    os.environ.setdefault("OPENAI_BASE_URL", BASE_URL)
    os.environ.setdefault("OPENAI_API_KEY", PLACEHOLDER_KEY)
    for name in HTTP_LIBRARIES:
        if name in sys.modules:
            _patch(sys.modules[name])
    if not any(isinstance(f, _ImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _ImportHook())


def _patch(module) -> None:
    from agentproc.openai_api import patch
    patch(module)


class _ImportHook:
    """A meta path finder: finds ``httpx``/``httpx2`` as the path finder would, and patches the module once it
    has run."""

    def find_spec(self, name, path=None, target=None):
        if name not in HTTP_LIBRARIES:
            return None
        from importlib.machinery import PathFinder
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader:
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _patch(module)

"""Where the kernel listens (docs/abi.md section 1).  No dependencies: agents import it on every start."""
from __future__ import annotations

import os

ABI_VERSION = 1
SOCKET_NAME = "kernel.sock"


def default_runtime_dir() -> str:
    """The runtime directory both ``aiosd`` and ``aiosctl`` use unless told otherwise.

    ``$AIOSD_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/aiosd``, else ``/tmp/aiosd-<uid>``.
    """
    env = os.environ.get("AIOSD_RUNTIME_DIR")
    if env:
        return env
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "aiosd")
    return f"/tmp/aiosd-{os.getuid()}"


def endpoint(runtime_dir: str) -> str:
    """The kernel's ZeroMQ endpoint inside ``runtime_dir``."""
    return "ipc://" + os.path.join(os.path.abspath(runtime_dir), SOCKET_NAME)

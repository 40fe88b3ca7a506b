"""Where the kernel listens (docs/abi.md section 1).  No dependencies: agents import it on every start."""
from __future__ import annotations

import os

ABI_VERSION = 1
SOCKET_NAME = "kernel.sock"
OPERATOR_KEY_NAME = "operator.key"  # the operator credential, 0600 in the 0700 runtime dir (docs/abi.md 1)
OPERATOR_PREFIX = b"O"  # an operator's routing id: b"O" + the 16-byte key + 8 random bytes


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


def operator_routing_id(endpoint_: str) -> bytes | None:
    """The routing id that proves an operator to the kernel at ``endpoint_``: ``b"O"`` + the kernel's operator
    key (read from ``<runtime-dir>/operator.key``, which only the kernel's user can read) + 8 random bytes (so
    that several operator connections stay distinct).  None when the key cannot be read: agents, other users,
    or no kernel there."""
    if not endpoint_.startswith("ipc://"):
        return None
    path = os.path.join(os.path.dirname(endpoint_[len("ipc://"):]), OPERATOR_KEY_NAME)
    try:
        with open(path, "rb") as f:
            key = f.read(64)
    except OSError:
        return None
    if len(key) != 16:
        return None
    return OPERATOR_PREFIX + key + os.urandom(8)

"""Network and IPC namespaces: an agent in its own has no network interface but loopback (down)."""
from __future__ import annotations

import ctypes
import os

from sandbox.policy import LayerUnavailable

CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000


def isolate(requested: bool, root: bool) -> str:
    if not requested:
        raise LayerUnavailable("not requested")
    if not root:
        raise LayerUnavailable("needs root (the kernel is not running as root)")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET | CLONE_NEWIPC) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "net, ipc"

"""Run the agent as its own uid/gid (from the kernel's pool), with no supplementary groups."""
from __future__ import annotations

import os

from sandbox.policy import LayerUnavailable


def switch(uid: int | None, gid: int | None) -> str:
    if uid is None:
        raise LayerUnavailable("no uid pool (needs a root kernel); the agent shares the kernel's uid")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    return f"uid {uid} gid {gid}"

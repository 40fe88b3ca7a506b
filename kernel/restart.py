"""Restart policy: whether and when an ended process of a restart chain is relaunched (docs/abi.md, "Restart
chains"; docs/operating.md, "Restarts").

Policy only: ``plan`` reads a process record and the chain behind it and answers; the kernel does the relaunch
(``Kernel._relaunch``).  Backoff is exponential -- ``restart_delay_s`` doubled after every relaunch within
``restart_interval_s``, at most ``restart_delay_max_s`` -- and more than ``restart_burst`` relaunches within
``restart_interval_s`` is a crash loop that ends the chain.  A chain that has spent a lifetime quota is not
relaunched either: a relaunch would start over it (the quotas count the whole chain).
"""
from __future__ import annotations

from typing import Callable

from kernel.proc import Proc, State

# Lifetime quotas: a chain's runs add up against them (kernel.proc.Proc.continue_chain).
LIFETIME_QUOTAS = ("llm_tokens", "cpu_seconds", "wall_seconds")


def wanted(proc: Proc) -> bool:
    """Does the policy relaunch ``proc`` now that it has ended (ignoring backoff and limits)?"""
    if proc.restart == "no" or proc.stopped or proc.alive:
        return False
    if proc.state is State.LOST or proc.restart == "always":
        return True
    return proc.state is State.KILLED or (proc.exit_status or 0) != 0  # on-failure


def spent(proc: Proc) -> str | None:
    """The lifetime quota the chain has used up, as a reason; None if none."""
    used = {"llm_tokens": proc.prompt_tokens + proc.completion_tokens, "cpu_seconds": proc.cpu_seconds,
            "wall_seconds": proc.wall_seconds()}
    for key in LIFETIME_QUOTAS:
        limit = proc.limits.get(key)
        if limit is not None and used[key] >= limit:
            return f"its chain has spent its {key} quota ({used[key]:.0f} of {limit})"
    return None


def recent_relaunches(proc: Proc, lookup: Callable[[int], Proc | None], since: float) -> int:
    """How many runs of ``proc``'s chain, ``proc`` included, were relaunches started after ``since``."""
    n, run = 0, proc
    while run is not None and run.previous is not None and run.started_at >= since:
        n += 1
        run = lookup(run.previous)
    return n


def plan(proc: Proc, lookup: Callable[[int], Proc | None], kc, now: float) -> tuple[float | None, str | None]:
    """``(delay_s, None)``: relaunch ``proc``'s chain after ``delay_s``; ``(None, why)``: do not (``why`` None
    when the policy simply says no, else the reason to record: a spent quota, a crash loop).  ``kc``: the
    ``[kernel]`` config section; ``lookup``: a process by id (None when its record was pruned)."""
    if not wanted(proc):
        return None, None
    why = spent(proc)
    if why:
        return None, f"not relaunched: {why}"
    n = recent_relaunches(proc, lookup, now - kc.restart_interval_s)
    if n >= kc.restart_burst:
        return None, (f"not relaunched: a crash loop ({n} relaunches within {kc.restart_interval_s:g} s; "
                      "[kernel] restart_burst)")
    return min(kc.restart_delay_max_s, kc.restart_delay_s * 2 ** n), None

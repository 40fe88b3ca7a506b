"""Isolation layers applied to agent processes (and the few process controls the kernel needs itself)."""

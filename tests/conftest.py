"""What the project's own tests need beyond the test kit's pytest plugin (``kernel.pytest_plugin``, found
through its ``pytest11`` entry point once the package is installed): where the repository and its model
cache are.

The kernel fixtures (``kernel``, ``fresh_kernel``, ``make_kernel``, ``model_path``...) and ``KernelProc``
live in the package (``kernel/testing.py``), so that people testing their own agents, ``bench/`` and
``examples/`` use them without importing ``tests``.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Kernels started by the tests keep the assembled model in the repository's .state (make test sets the same).
os.environ.setdefault("AIOSD_STATE_DIR", str(REPO / ".state"))
STATE_DIR = Path(os.environ["AIOSD_STATE_DIR"])

PLUGIN = "kernel.pytest_plugin"


def pytest_configure(config) -> None:
    """Register the plugin ourselves where its entry point is not installed (a checkout run before
    ``pip install -e .``): once, never twice."""
    import importlib

    module = importlib.import_module(PLUGIN)
    if not config.pluginmanager.is_registered(module):
        config.pluginmanager.register(module, PLUGIN)

"""Agents with their own packages (docs/abi.md, proc.spawn ``venv``): an operator's virtual environment, made here
for real (``python -m venv --without-pip``, a tiny pure-Python package dropped into its site-packages), imported
by a real sandboxed agent; nothing else of the venv and no venv for an agent that was not given one."""
from __future__ import annotations

import subprocess
import sys

import pytest

from agentproc.errors import EINVAL
from kernel.testing import config_text
from tests.helpers import make_venv

pytestmark = pytest.mark.timeout(180)

USES = "import tinypkg, sys\nprint('VALUE', tinypkg.VALUE, tinypkg.__file__, flush=True)\n"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    return make_venv(tmp_path_factory.mktemp("venvs"))


def test_an_agent_imports_the_operators_venv(kernel, venv):
    rec, out = kernel.run(USES, venv=str(venv))
    assert rec["exit_status"] == 0, out
    assert "VALUE 42" in out and str(venv.resolve()) in out, out


def test_without_a_venv_the_package_is_not_there(kernel, venv):
    rec, out = kernel.run(USES)
    assert rec["exit_status"] != 0 and "ModuleNotFoundError" in out, out


def test_a_path_that_is_not_a_venv_is_refused(kernel, tmp_path):
    with pytest.raises(EINVAL, match="not a virtual environment"):
        kernel.spawn("pass", venv=str(tmp_path))
    with pytest.raises(EINVAL):
        kernel.spawn("pass", venv="relative/path")


def test_a_groups_venv(make_kernel, venv):
    k = make_kernel(config_text(groups={"research": {"privileges": ["basic", "llm"], "venv": str(venv)}}))
    rec, out = k.run(USES, group="research")
    assert rec["exit_status"] == 0 and "VALUE 42" in out, out
    rec, out = k.run(USES)  # other groups do not get it
    assert "ModuleNotFoundError" in out, out


def test_aiosctl_run_venv(kernel, venv, tmp_path):
    agent = tmp_path / "uses.py"
    agent.write_text(USES)
    run = subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(kernel.runtime_dir), "run",
                          "--wait", "--venv", str(venv), str(agent)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "VALUE 42" in run.stdout, run.stdout + run.stderr

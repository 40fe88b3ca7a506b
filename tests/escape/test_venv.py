"""Attacks through agents' own packages (docs/abi.md, proc.spawn ``venv``): an agent naming a venv -- that is, a
path for another agent's read set --, and an agent given a venv reading beyond its site-packages."""
from __future__ import annotations

import pytest

from tests.escape.conftest import attack, denied, need
from tests.helpers import make_venv

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    return make_venv(tmp_path_factory.mktemp("venvs"))


def test_an_agent_cannot_name_a_venv_nor_read_beyond_site_packages(kernel, venv, layers, neighbour):
    """Even an admin agent may not point another agent's read set at a path; an agent given a venv reads its
    site-packages and nothing else of it."""
    rec, res, out = attack(kernel, f"""
        from agentproc import client
        attempt("spawn_venv", lambda: client.default().call("proc.spawn", {{"source": "pass",
                                                                             "venv": {str(venv)!r}}}))
        attempt("spawn_root", lambda: client.default().call("proc.spawn", {{"source": "pass", "venv": "/"}}))
    """, group="admin", name="venv-setter")
    assert denied(res, "spawn_venv", "EPERM") and denied(res, "spawn_root", "EPERM"), out
    need(layers, "landlock")
    rec, res, out = attack(kernel, f"""
        import tinypkg
        attempt("site", lambda: tinypkg.VALUE)
        attempt("secret", lambda: open({str(venv / "secret.txt")!r}).read())
        attempt("cfg", lambda: open({str(venv / "pyvenv.cfg")!r}).read())
    """, name="venv-reader", venv=str(venv))
    assert res["site"] == "OK 42", out
    assert denied(res, "secret") and denied(res, "cfg"), out
    neighbour.assert_unharmed()


@pytest.mark.parametrize("path", ["../escape.py", "/etc/cron.d/x", "a/../../b.py", ".bashrc", "a/.hidden/x.py",
                                  "a//b.py", "", "/".join(["d"] * 17) + "/x.py", "x" * 300])
def test_shipped_files_stay_in_the_scratch_dir(kernel, path):
    from agentproc.errors import EINVAL

    with pytest.raises(EINVAL):
        kernel.spawn("pass", files={path: "print('planted')"})


def test_too_many_files_or_the_program_twice_are_refused(kernel):
    from agentproc.errors import EINVAL

    with pytest.raises(EINVAL):
        kernel.spawn("pass", files={f"m{i}.py": "" for i in range(257)})
    with pytest.raises(EINVAL, match="program itself"):
        kernel.spawn("pass", files={"agent.py": "print('other')"})
    rec, out = kernel.run("import m0, m255\nprint('ok')", files={f"m{i}.py": "" for i in range(256)})
    assert rec["exit_status"] == 0 and "ok" in out, out

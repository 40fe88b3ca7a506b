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

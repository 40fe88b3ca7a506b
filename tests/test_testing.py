"""The test kit (kernel/testing.py, kernel/pytest_plugin.py; docs/testing.md) as its users meet it: the
fixtures, the marker, the raw client, the config helpers."""
from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest

from kernel.testing import TEST_CONFIG, config_text, eventually
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(300)


def test_config_text_merges_sections_and_named_tables():
    text = config_text(kernel={"max_procs": 4}, groups={"tester": {"privileges": ["basic", "llm"],
                                                                   "limits": {"memory_mb": 256}}})
    doc = tomllib.loads(text)
    assert doc["kernel"] == {"max_frame": 65536, "max_procs": 4}
    assert doc["llm"] == tomllib.loads(TEST_CONFIG)["llm"]
    assert doc["groups"]["tester"] == {"privileges": ["basic", "llm"], "limits": {"memory_mb": 256}}
    with pytest.raises(ValueError, match="TOML holds"):
        config_text(kernel={"max_procs": None})


def test_config_text_is_a_config_the_kernel_accepts(tmp_path):
    from kernel.config import load

    path = tmp_path / "aiosd.toml"
    path.write_text(config_text(groups={"tester": {"privileges": ["basic"], "limits": {"wall_seconds": 5}}},
                                sandbox={"extra_read": ["/srv/data"]}))
    cfg = load(path)
    assert cfg.sandbox.extra_read == ["/srv/data"]


def test_eventually_returns_the_value_or_names_what_never_came():
    calls = []
    assert eventually(lambda: calls.append(1) or len(calls) >= 3) is True
    with pytest.raises(AssertionError, match="the moon"):
        eventually(lambda: False, timeout=0.1, what="the moon")


def test_raw_client_sends_malformed_frames_and_reads_envelopes(kernel, raw_client):
    assert raw_client.request("sys.ping") == {"v": 1, "id": 1, "ok": True, "result": {"pong": True}}
    raw_client.send(b"\xc1not msgpack")
    assert raw_client.recv()["error"]["code"] == "EBADMSG"
    assert raw_client.request("proc.fork")["error"]["code"] == "ENOSYS"


def test_an_anonymous_raw_client_is_no_operator(kernel):
    anon = kernel.raw_client(operator=False)
    reply = anon.request("proc.list")
    assert reply["ok"] is False and reply["error"]["code"] == "EACCES", reply


def test_spawn_file_wait_output_and_run(kernel, tmp_path):
    agent = tmp_path / "hello_agent.py"
    agent.write_text("import sys\nprint('hello', sys.argv[1], flush=True)\n")
    rec = kernel.spawn_file(agent, argv=["kit"])
    assert kernel.wait_output(rec["id"], "hello kit")
    assert kernel.wait(rec["id"])["name"] == "hello_agent"
    rec, out = kernel.run("print(6 * 7)")
    assert rec["exit_status"] == 0 and out.strip() == "42"


def test_the_shared_kernel_is_the_kernel_fixture(kernel, shared_kernel):
    assert kernel is shared_kernel


@pytest.mark.fresh_kernel(config=config_text(kernel={"max_procs": 1}))
def test_the_marker_gives_a_kernel_of_its_own_with_its_config(kernel, shared_kernel):
    assert kernel is not shared_kernel
    first = kernel.spawn("import time; time.sleep(30)")
    with pytest.raises(Exception, match="EAGAIN|max_procs"):
        kernel.spawn("pass")
    kernel.client.call("proc.kill", {"id": first["id"]})


def test_make_kernel_starts_several_and_stops_them(make_kernel):
    a, b = make_kernel(), make_kernel()
    assert a.endpoint != b.endpoint
    assert a.client.call("sys.ping") == b.client.call("sys.ping") == {"pong": True}


def test_nothing_outside_tests_imports_tests():
    """bench/, examples/ and the packages use the kit in the package, never the project's tests."""
    found = subprocess.run(["grep", "-rlE", r"^\s*(from tests[. ]|import tests)", "--include=*.py",
                            "bench", "examples", "kernel", "agentproc", "sandbox", "syscalls"],
                           cwd=REPO, capture_output=True, text=True).stdout.split()
    assert found == [], found


OUTSIDE_TEST = '''
import pytest
from kernel.testing import Trace, config_text

AGENT = "from agentproc import ping, storage\\nping()\\nstorage.put('k', 'v')\\nprint('done', flush=True)\\n"


def test_my_agent_runs(kernel):
    rec, out = kernel.run(AGENT, trace=True)
    assert rec["exit_status"] == 0 and "done" in out
    trace = Trace.fetch(kernel, rec["id"])
    assert "storage.put" in trace.calls and not trace.errors


@pytest.mark.fresh_kernel(config=config_text(groups={"tiny": {"privileges": ["basic"]}}))
def test_my_group_cannot_store(kernel):
    rec, out = kernel.run("from agentproc import storage\\nstorage.put('k', 'v')\\n", group="tiny")
    assert rec["exit_status"] != 0 and "EPERM" in out


def test_raw_frames(raw_client):
    assert raw_client.request("sys.ping")["result"] == {"pong": True}
'''


def test_a_project_outside_the_repository_uses_the_installed_plugin(tmp_path):
    """A user's own project: no conftest, no path into this repository -- the fixtures come from the pytest11
    entry point of the installed package."""
    from importlib.metadata import entry_points

    if not [e for e in entry_points(group="pytest11") if e.name == "aiosd"]:
        pytest.skip("the aiosd package is not installed with its entry points (run `make install`)")
    project = tmp_path / "myagents"
    project.mkdir()
    (project / "test_my_agent.py").write_text(OUTSIDE_TEST)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=240",
                             str(project)], cwd=project, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-2000:]

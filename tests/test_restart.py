"""Restart with nothing lost (docs/abi.md "Restart chains", docs/operating.md "Restarts"): the process table in
the state dir outlives the kernel -- a clean stop or ``kill -9`` -- ended agents keep their records, agents that
were running are LOST with the reason, restart chains are relaunched with backoff up to a crash-loop limit, and
storage and memory are intact."""
from __future__ import annotations

import textwrap
import time

import pytest

from kernel.testing import TEST_CONFIG, KernelProc, pid_gone

FAST = TEST_CONFIG.replace("[kernel]", "[kernel]\nrestart_delay_s = 0.2\nrestart_delay_max_s = 0.8\n"
                                       "restart_burst = 3\nrestart_interval_s = 600\ndrain_s = 0")

SLEEPER = "import time\nprint('up', flush=True)\ntime.sleep(600)\n"


def spawn(k: KernelProc, source: str, **args) -> dict:
    return k.client.call("proc.spawn", {"source": textwrap.dedent(source), **args})


def until(fn, timeout: float = 60.0, what: str = "the condition"):
    """``fn()``'s first truthy value, polled (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def running(k: KernelProc, pid_: int) -> dict:
    return until(lambda: (r := k.record(pid_))["state"] == "RUNNING" and k.output(pid_).startswith("up") and r,
                 what=f"agent {pid_} running")


def chain(k: KernelProc, first: int) -> list[dict]:
    """The records of the restart chain that starts at ``first``, in order."""
    by_id = {p["id"]: p for p in k.client.call("proc.list")["procs"]}
    runs = [by_id[first]]
    while runs[-1]["next"] is not None:
        runs.append(by_id[runs[-1]["next"]])
    return runs


@pytest.fixture
def kernel_r(tmp_path, model_path):
    holder = {"k": KernelProc(tmp_path, FAST)}
    yield holder
    holder["k"].stop()


def test_records_survive_a_clean_restart_and_running_agents_are_lost(kernel_r):
    k = kernel_r["k"]
    done = k.wait(spawn(k, "print('bye')\nraise SystemExit(3)\n", name="done")["id"])
    killed = spawn(k, SLEEPER, name="killed")["id"]
    running(k, killed)
    k.client.call("proc.kill", {"id": killed})
    killed_rec = k.wait(killed)
    alive = spawn(k, SLEEPER, name="alive")["id"]
    alive_pid = running(k, alive)["pid"]

    k = kernel_r["k"] = k.restarted()
    assert pid_gone(alive_pid)
    assert k.record(done["id"]) == {**done, "usage": k.record(done["id"])["usage"]}
    assert k.record(done["id"])["exit_status"] == 3 and k.record(killed) == killed_rec
    lost = k.record(alive)
    assert lost["state"] == "LOST" and lost["reason"] == "kernel shutdown (SIGTERM)", lost
    assert lost["ended_at"] and lost["next"] is None  # no restart policy: not relaunched
    assert k.output(done["id"]) == ""  # captured output stays with the runtime dir
    assert spawn(k, "pass\n")["id"] > alive  # ids continue, never reused


def test_kill_9_restart_keeps_records_storage_memory_and_relaunches_restart_chains(kernel_r):
    k = kernel_r["k"]
    writer = k.wait(spawn(k, """
        from agentproc import memory, storage
        storage.put("notes/a", b"kept across a crash")
        memory.add("the kernel restarted and nothing was lost")
    """, name="writer")["id"])
    assert writer["exit_status"] == 0, k.output(writer["id"])
    plain = spawn(k, SLEEPER, name="plain")["id"]
    keeper = spawn(k, SLEEPER, name="keeper", restart="on-failure")["id"]
    pids = [running(k, plain)["pid"], running(k, keeper)["pid"]]
    old_kernel = k.popen.pid

    assert k.kill9() == -9
    k = kernel_r["k"] = k.restarted()
    assert all(pid_gone(p) for p in pids)
    for pid_ in (plain, keeper):
        rec = k.record(pid_)
        assert rec["state"] == "LOST" and f"kernel pid {old_kernel} ended" in rec["reason"], rec
    assert k.record(plain)["next"] is None
    relaunch = until(lambda: k.record(keeper)["next"], what="the relaunch")
    rec = running(k, relaunch)
    assert rec["previous"] == keeper and rec["restarts"] == 1 and rec["restart"] == "on-failure"
    assert rec["name"] == "keeper"
    reader = k.wait(spawn(k, """
        from agentproc import memory, storage
        print(storage.get("notes/a").data.decode())
        print(memory.search("did the kernel lose anything?", k=1)[0].text)
    """, name="writer")["id"])
    out = k.output(reader["id"])
    assert reader["exit_status"] == 0 and "kept across a crash" in out and "nothing was lost" in out, out


def test_on_failure_relaunches_with_backoff_then_stops_at_the_crash_loop_limit(kernel_r):
    k = kernel_r["k"]
    first = spawn(k, "raise SystemExit(2)\n", name="crasher", restart="on-failure")["id"]
    runs = until(lambda: (c := chain(k, first))[-1]["state"] == "EXITED" and "crash loop" in (c[-1]["reason"] or "")
                 and c, what="the crash loop")
    assert len(runs) == 4 and [r["restarts"] for r in runs] == [0, 1, 2, 3]  # restart_burst = 3
    assert all(r["exit_status"] == 2 and r["restart_at"] is None for r in runs)
    gaps = [b["started_at"] - a["ended_at"] for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8, gaps  # doubling, capped at 0.8
    time.sleep(1.0)
    assert chain(k, first)[-1]["next"] is None


def test_policies_on_success_and_an_operators_stop(kernel_r):
    k = kernel_r["k"]
    ok = k.wait(spawn(k, "pass\n", restart="on-failure")["id"])
    again = spawn(k, "import os\nraise SystemExit(0 if os.path.exists('/nonexistent') else 0)\n", restart="always")
    second = until(lambda: k.record(again["id"])["next"], what="always relaunching after exit 0")
    k.client.call("proc.kill", {"id": second})  # a stop: the chain ends whatever state it is in
    time.sleep(1.5)
    runs = chain(k, again["id"])
    assert runs[-1]["next"] is None and all(r["state"] in ("EXITED", "KILLED") for r in runs)
    assert "stopped by operator" in (runs[-1]["reason"] or "") or runs[-1]["state"] == "KILLED", runs[-1]
    assert k.record(ok["id"])["next"] is None and k.record(ok["id"])["restart_at"] is None


def test_kill_with_a_signal_the_agent_handles(kernel_r):
    k = kernel_r["k"]
    pid_ = spawn(k, """
        import signal, sys, time
        signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(7)))
        print("up", flush=True)
        time.sleep(600)
    """, restart="on-failure")["id"]
    running(k, pid_)
    k.client.call("proc.kill", {"id": pid_, "signal": "SIGTERM"})
    rec = k.wait(pid_)
    assert rec["exit_status"] == 7 and "got SIGTERM" in k.output(pid_)
    time.sleep(0.6)
    assert k.record(pid_)["next"] is None  # SIGTERM from an operator is a stop


def test_second_kernel_on_the_same_state_dir_refuses(kernel_r, tmp_path):
    import subprocess
    import sys

    from kernel.models import ensure_default_model
    from tests.conftest import REPO, STATE_DIR
    k = kernel_r["k"]
    r = subprocess.run([sys.executable, "-m", "kernel.main", "--runtime-dir", str(tmp_path / "other"),
                        "--state-dir", str(k.state_dir), "--config", str(k.config_path), "--model",
                        str(ensure_default_model(STATE_DIR))],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 1 and "another kernel uses the state dir" in r.stderr, r.stderr


def test_the_table_on_disk_keeps_the_newest_records_and_one_kernel(tmp_path):
    from kernel.procdb import ProcDB, ProcDBError

    db = ProcDB(tmp_path / "procs.db")
    with pytest.raises(ProcDBError, match="another kernel uses the state dir"):
        ProcDB(tmp_path / "procs.db")
    ended = [{"id": i, "state": "EXITED", "restart_at": None} for i in range(1, 8)]
    db.save(ended + [{"id": 8, "state": "RUNNING", "restart_at": None},
                     {"id": 9, "state": "EXITED", "restart_at": 1.0}], {9: {"source": "pass"}}, {"next_id": 12})
    db.close()
    db = ProcDB(tmp_path / "procs.db")  # the lock went with the first
    rows, meta = db.load(keep=3)
    assert [r["id"] for r, _ in rows] == [7, 8, 9] and rows[2][1] == {"source": "pass"} and meta["next_id"] == "12"
    rows, _ = db.load(keep=1)  # live and waiting records are never pruned
    assert [r["id"] for r, _ in rows] == [8, 9]
    db.close()


def test_kill_9_in_the_middle_of_writes_loses_no_committed_record(tmp_path):
    import signal
    import subprocess
    import sys

    from kernel.procdb import ProcDB
    from tests.conftest import REPO

    writer = subprocess.Popen([sys.executable, "-c", f"""
import sys
from kernel.procdb import ProcDB
db = ProcDB({str(tmp_path / "procs.db")!r})
i = 0
while True:
    i += 1
    db.save([{{"id": i, "state": "RUNNING", "restart_at": None, "pad": "x" * 2000}}], meta={{"next_id": i + 1}})
    print(i, flush=True)
"""], stdout=subprocess.PIPE, text=True, cwd=REPO)
    committed = 0
    for line in writer.stdout:
        committed = int(line)
        if committed >= 300:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait(10)
    db = ProcDB(tmp_path / "procs.db")  # the killed writer's lock went with it
    rows, meta = db.load()
    db.close()
    ids = [r["id"] for r, _ in rows]
    assert ids[:committed] == list(range(1, committed + 1)) and int(meta["next_id"]) >= committed + 1

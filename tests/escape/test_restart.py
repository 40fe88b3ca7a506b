"""Restarts as an escape route (docs/abi.md "Restart chains"): a crash, a relaunch or a kernel crash must not
reset a lifetime quota, a crash loop must not cost the kernel unbounded work, and an agent can neither give
itself a restart policy nor signal another agent."""
from __future__ import annotations

import time

import pytest

from kernel.testing import TEST_CONFIG, KernelProc
from tests.test_restart import chain, running, spawn, until

pytestmark = pytest.mark.timeout(120)

FAST = TEST_CONFIG.replace("[kernel]", "[kernel]\nrestart_delay_s = 0.1\nrestart_delay_max_s = 0.2\n"
                                       "restart_burst = 20\nrestart_interval_s = 600\ndrain_s = 0")

# Spends all the tokens it can, then crashes to be relaunched with a fresh quota, it hopes.
BURNER = """
from agentproc import llm
from agentproc.errors import EDQUOT
try:
    while True:
        llm.generate("Count to a hundred: 1, 2, 3,", max_tokens=16)
except EDQUOT as e:
    print("EDQUOT", e, flush=True)
raise SystemExit(1)
"""


@pytest.fixture
def kernel_r(tmp_path, model_path):
    holder = {"k": KernelProc(tmp_path, FAST)}
    yield holder
    holder["k"].stop()


def test_a_crash_and_relaunch_do_not_reset_the_token_quota(kernel_r):
    k = kernel_r["k"]
    first = spawn(k, BURNER, restart="always", limits={"llm_tokens": 60})["id"]
    runs = until(lambda: (c := chain(k, first))[-1]["state"] != "RUNNING" and "quota" in (c[-1]["reason"] or "")
                 and c, timeout=90, what="the chain stopping on its spent quota")
    assert "spent its llm_tokens quota" in runs[-1]["reason"], runs[-1]
    assert all(r["usage"]["llm_tokens"] <= 60 for r in runs), [r["usage"] for r in runs]
    assert len(runs) <= 2  # the first run spends it; a relaunch, if any, starts spent and stops
    time.sleep(0.5)
    assert chain(k, first)[-1]["next"] is None


def test_a_kernel_crash_does_not_reset_the_token_quota(kernel_r):
    k = kernel_r["k"]
    first = spawn(k, """
        import time
        from agentproc import llm
        r = llm.generate("The capital of France is", max_tokens=10)
        print("up", r.usage["prompt_tokens"] + r.usage["completion_tokens"], flush=True)
        time.sleep(600)
    """, restart="on-failure", limits={"llm_tokens": 1000})["id"]
    spent = int(running(k, first) and k.output(first).split()[1])
    assert k.record(first)["usage"]["llm_tokens"] == spent
    k.kill9()
    k = kernel_r["k"] = k.restarted()
    relaunch = until(lambda: k.record(first)["next"], what="the relaunch")
    rec = k.record(relaunch)
    assert rec["usage"]["llm_tokens"] >= spent and rec["limits"]["llm_tokens"] == 1000, rec


def test_a_crash_loop_costs_the_kernel_a_bounded_number_of_relaunches(tmp_path, model_path):
    k = KernelProc(tmp_path, FAST.replace("restart_burst = 20", "restart_burst = 4"))
    try:
        first = spawn(k, "raise SystemExit(1)\n", restart="always")["id"]
        until(lambda: "crash loop" in (chain(k, first)[-1]["reason"] or ""), what="the crash loop limit")
        time.sleep(1.0)
        assert len(chain(k, first)) == 5 and k.client.call("sys.ping") == {"pong": True}
    finally:
        k.stop()


def test_an_agent_cannot_give_itself_a_restart_policy_or_signal_another(kernel_r):
    k = kernel_r["k"]
    other = spawn(k, "import time\nprint('up', flush=True)\ntime.sleep(600)\n")["id"]
    running(k, other)
    rec = k.wait(spawn(k, f"""
        from agentproc.client import default
        from agentproc.errors import EPERM
        c = default()
        for call, args in (("proc.spawn", {{"source": "pass", "restart": "always"}}),
                           ("proc.kill", {{"id": {other}, "signal": "SIGSTOP"}}),
                           ("proc.kill", {{"id": {other}, "signal": "SIGTERM"}})):
            try:
                c.call(call, args)
                print(call, "OK")
            except EPERM:
                print(call, "EPERM")
    """)["id"])
    out = k.output(rec["id"])
    assert out.count("EPERM") == 3, out
    assert k.record(other)["state"] == "RUNNING"

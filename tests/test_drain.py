"""SIGTERM drains (docs/operating.md): no new work is admitted (ECANCELED), a generation under way finishes and
reaches its agent, then the kernel stops its agents and exits 0; a second SIGTERM does not wait."""
from __future__ import annotations

import signal
import time

import pytest

from agentproc.errors import ECANCELED
from kernel.testing import TEST_CONFIG, KernelProc
from tests.escape.conftest import wait_output

pytestmark = pytest.mark.timeout(120)

WRITER = """
import time
from agentproc import llm
from agentproc.errors import ECANCELED
print("START", flush=True)
out = llm.generate("Once upon a time, in a quiet village by the sea,", max_tokens=300, temperature=0.0)
print("DONE", out.usage["completion_tokens"], flush=True)
time.sleep(60)
"""


def test_sigterm_lets_a_generation_finish_then_exits(tmp_path, model_path):
    k = KernelProc(tmp_path, TEST_CONFIG.replace("[kernel]", "[kernel]\ndrain_s = 60"))
    try:
        agent = k.spawn(WRITER, name="writer")["id"]
        wait_output(k, agent, "START")
        time.sleep(0.5)  # the generation is under way
        client = k.new_client()
        k.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(ECANCELED, match="shutting down"):  # new work is refused while the drain runs
            client.call("llm.generate", {"prompt": "Another story", "max_tokens": 4})
        assert k.popen.wait(90) == 0
        out = (tmp_path / "run" / "logs" / f"{agent}.log").read_text()  # the kernel is gone; its log stays
        assert "DONE 300" in out, out  # the generation under way finished and reached its agent
        assert "draining (SIGTERM)" in k.log() and "shutting down: SIGTERM (drained" in k.log()
    finally:
        k.stop()


def test_a_second_sigterm_does_not_wait(tmp_path, model_path):
    k = KernelProc(tmp_path, TEST_CONFIG.replace("[kernel]", "[kernel]\ndrain_s = 600"))
    try:
        agent = k.spawn(WRITER.replace("max_tokens=300", "max_tokens=4000"), name="long")["id"]
        wait_output(k, agent, "START")
        time.sleep(0.5)
        k.popen.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert k.popen.poll() is None  # draining
        t0 = time.monotonic()
        k.popen.send_signal(signal.SIGTERM)
        assert k.popen.wait(30) == 0 and time.monotonic() - t0 < 20
    finally:
        k.stop()

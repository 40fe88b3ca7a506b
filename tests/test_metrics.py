"""Prometheus metrics from the real kernel after a real workload (kernel/metrics.py): through `sys.metrics`
(`aiosctl metrics`) and the opt-in loopback HTTP listener; every family present with sane values; agents
cannot read them."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from kernel.testing import TEST_CONFIG, KernelProc
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)

WORKER = """
from agentproc import llm, tools
from agentproc.errors import EPERM
from agentproc.client import default
llm.generate("The capital of France is", max_tokens=8)
tools.call("calculator", expression="6*7")
try:
    default().call("sys.metrics")
    print("METRICS readable", flush=True)
except EPERM:
    print("METRICS refused", flush=True)
import time
time.sleep(30)
"""


def value(text: str, series: str) -> float:
    m = re.search(r"^" + re.escape(series) + r" ([0-9.e+-]+)$", text, re.M)
    assert m, f"no {series} in:\n{text}"
    return float(m.group(1))


def test_metrics_after_a_workload(tmp_path, model_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    k = KernelProc(tmp_path, TEST_CONFIG.replace("[kernel]", f"[kernel]\nmetrics_port = {port}"))
    try:
        worker = k.spawn(WORKER, name="worker")["id"]
        k.client.call("proc.spawn", {"source": "import time\ntime.sleep(60)", "name": "slow",
                                     "limits": {"wall_seconds": 1}})
        deadline = time.monotonic() + 60
        while "METRICS" not in k.output(worker) or not any(
                p["reason"] and p["reason"].startswith("WallTimeLimit") for p in k.client.call("proc.list")["procs"]):
            assert time.monotonic() < deadline, k.output(worker)
            time.sleep(0.2)
        assert "METRICS refused" in k.output(worker)
        text = subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(k.runtime_dir),
                               "metrics"], capture_output=True, text=True, timeout=30, cwd=REPO).stdout
        assert value(text, 'aiosd_llm_generated_tokens_total{model="default"}') >= 8
        assert value(text, 'aiosd_llm_prompt_tokens_total{model="default"}') > 0
        assert value(text, 'aiosd_llm_kv_cells{model="default"}') > 0
        assert value(text, 'aiosd_llm_kv_cells_used{model="default"}') >= 0
        assert value(text, 'aiosd_llm_batch_active{model="default"}') >= 0
        assert value(text, 'aiosd_llm_requests_waiting{model="default"}') == 0
        assert value(text, 'aiosd_llm_evictions_total{model="default"}') >= 0
        assert value(text, 'aiosd_llm_batch_tokens_total{kind="decode",model="default"}') >= 7
        assert value(text, 'aiosd_llm_engine_seconds_total{model="default",part="step"}') > 0
        assert value(text, 'aiosd_main_thread_seconds_total{part="router"}') > 0
        assert value(text, 'aiosd_syscall_seconds_count{call="llm.generate"}') >= 1
        assert value(text, 'aiosd_syscall_seconds_count{call="tool.call"}') >= 1
        assert value(text, 'aiosd_tool_calls_total{pool="calculator"}') >= 1
        assert value(text, 'aiosd_limit_kills_total{reason="WallTimeLimit"}') == 1
        assert value(text, f'aiosd_agent_tokens_total{{agent="{worker}",group="default",name="worker"}}') >= 8
        assert value(text, 'aiosd_processes{state="RUNNING"}') >= 1
        time.sleep(1.2)  # the listener serves what the event loop rendered at most a second ago
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            scraped = r.read().decode()
        assert value(scraped, 'aiosd_tool_calls_total{pool="calculator"}') >= 1
    finally:
        k.stop()


def test_aiosctl_top_shows_agents_and_engines(kernel):
    agent = kernel.spawn("import time\nfrom agentproc import llm\nllm.generate('Hi', max_tokens=4)\ntime.sleep(30)",
                         name="topped")["id"]
    deadline = time.monotonic() + 30
    while kernel.record(agent)["usage"]["llm_tokens"] == 0 or "rss_mb" not in kernel.record(agent)["usage"]:
        assert time.monotonic() < deadline, kernel.record(agent)
        time.sleep(0.2)
    out = subprocess.run([sys.executable, "-m", "agentproc.ctl", "--runtime-dir", str(kernel.runtime_dir), "top",
                          "-n", "2", "--interval", "0.5"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "engine default: batch" in out.stdout and "RSS MB" in out.stdout
    line = next(l for l in out.stdout.splitlines() if " topped " in l)
    assert "RUNNING" in line and float(line.split()[5]) > 1  # RSS MB of a live Python process
    assert out.stdout.count("aiosd pid") == 2  # two frames, plain text (not a terminal)
    kernel.client.call("proc.kill", {"id": agent})

"""The kernel hop in front of a remote core (docs/remote.md): ``AGENTS`` agent processes, each sending
``REQUESTS`` ``llm.generate`` requests one after another to a remote core (``[models.remote] kind = "openai"``)
that is llama-cpp-python's server on the embedded model, against ``AGENTS`` client threads sending the very same
HTTP requests (the same JSON bodies the kernel sends) straight to the same server, in the same run.

Each round runs both systems on the one server, alternating which goes first; the figure is the ratio of the
median wall times (the first request sent to the last answer received), minus one: what the kernel hop adds.
Greedy sampling and a fixed ``max_tokens`` make the work identical (the completion tokens are checked equal).
``AIOSD_REMOTE_AGENTS``, ``AIOSD_REMOTE_REQUESTS``, ``AIOSD_REMOTE_ROUNDS`` shrink it for a quick look.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import median, save
from kernel import testing

AGENTS = int(os.environ.get("AIOSD_REMOTE_AGENTS", 32))
REQUESTS = int(os.environ.get("AIOSD_REMOTE_REQUESTS", 2))
ROUNDS = int(os.environ.get("AIOSD_REMOTE_ROUNDS", 2))
MAX_TOKENS = 16
THREADS = 2
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "The three primary colours are",
           "A recipe for pancakes: first,", "The tallest mountain in the world is", "def fibonacci(n):",
           "Dear customer, thank you for", "The history of the bicycle begins"]

AGENT = """
import json, sys, time
from agentproc import llm
prompts, start, i = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
n, max_tokens = int(sys.argv[4]), int(sys.argv[5])
time.sleep(max(0.0, start - time.time()))
tokens = 0
for j in range(n):
    c = llm.generate(prompts[(i + j) % len(prompts)], max_tokens=max_tokens, temperature=0.0, model="remote")
    tokens += c.usage["completion_tokens"]
print("RESULT", json.dumps({"end": time.time(), "tokens": tokens}), flush=True)
"""


def body(i: int, j: int) -> dict:
    """Request ``j`` of agent ``i``, exactly as the kernel's remote core sends it (kernel/llm/remote.py)."""
    return {"model": "remote", "max_tokens": MAX_TOKENS, "temperature": 0.0, "top_p": 0.95, "top_k": 40,
            "prompt": PROMPTS[(i + j) % len(PROMPTS)]}


def run_direct(base_url: str) -> dict:
    """``AGENTS`` threads, one HTTP client each, the same requests straight to the server."""
    tokens = [0] * AGENTS
    start = time.time() + 0.5
    ends = [0.0] * AGENTS

    def client(i: int) -> None:
        with httpx.Client(base_url=base_url + "/", timeout=600, trust_env=False) as c:
            time.sleep(max(0.0, start - time.time()))
            for j in range(REQUESTS):
                r = c.post("completions", json=body(i, j))
                r.raise_for_status()
                tokens[i] += r.json()["usage"]["completion_tokens"]
            ends[i] = time.time()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(AGENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"wall_s": max(ends) - start, "tokens": sum(tokens)}


def run_kernel(kernel: testing.KernelProc) -> dict:
    """``AGENTS`` agent processes on the kernel's remote core, started together once all are spawned."""
    start = time.time() + 2.0 + 0.15 * AGENTS  # spawning takes ~0.1 s an agent
    ids = [kernel.spawn(AGENT, name=f"remote-{i}", argv=[json.dumps(PROMPTS), str(start), str(i), str(REQUESTS),
                                                         str(MAX_TOKENS)])["id"] for i in range(AGENTS)]
    assert time.time() < start, "spawning took longer than the head start; raise it"
    results = []
    for agent_id in ids:
        rec = kernel.wait(agent_id, 1800)
        out = kernel.output(agent_id)
        assert rec["exit_status"] == 0, out
        results.append(json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][-1][7:]))
    return {"wall_s": max(r["end"] for r in results) - start, "tokens": sum(r["tokens"] for r in results)}


def main() -> None:
    model_path = testing.model_path()
    server = testing.LlamaServer(model_path, threads=THREADS)
    tmp = Path(tempfile.mkdtemp(prefix="aiosd-bench-remote-"))
    config = testing.TEST_CONFIG.replace("max_procs = 32", f"max_procs = {AGENTS + 8}") + f"""
[models.remote]
kind = "openai"
base_url = "{server.base_url}"
concurrency = {AGENTS}
agent_concurrency = 1
timeout_s = 600
"""
    rounds = []
    try:
        kernel = testing.KernelProc(tmp, config)
        try:
            httpx.post(f"{server.base_url}/completions", json=body(0, 0), timeout=600)  # warm-up
            for r in range(ROUNDS):
                order = [("direct", lambda: run_direct(server.base_url)), ("kernel", lambda: run_kernel(kernel))]
                got = dict((name, fn()) for name, fn in (order if r % 2 == 0 else order[::-1]))
                assert got["direct"]["tokens"] == got["kernel"]["tokens"] == AGENTS * REQUESTS * MAX_TOKENS, got
                rounds.append(got)
                print(f"remote round {r + 1}: direct {got['direct']['wall_s']:.2f} s, through the kernel "
                      f"{got['kernel']['wall_s']:.2f} s", flush=True)
            stats = kernel.client.call("sys.status")["llm"]["remote"]
        finally:
            kernel.stop()
    finally:
        server.stop()
    direct = median([g["direct"]["wall_s"] for g in rounds])
    through = median([g["kernel"]["wall_s"] for g in rounds])
    overhead = through / direct - 1
    res = {"agents": AGENTS, "requests_per_agent": REQUESTS, "max_tokens": MAX_TOKENS, "rounds": ROUNDS,
           "direct_wall_s": round(direct, 3), "kernel_wall_s": round(through, 3), "overhead": round(overhead, 4),
           "goal": "<= 0.05", "tokens_per_system": AGENTS * REQUESTS * MAX_TOKENS,
           "server": f"llama_cpp.server, {THREADS} threads, the embedded model",
           "remote_stats": {k: stats[k] for k in ("requests", "failures", "retries")},
           "rounds_wall_s": [{k: round(v["wall_s"], 3) for k, v in g.items()} for g in rounds]}
    save("remote", res)
    print(f"remote core: {AGENTS} agents x {REQUESTS} requests, direct {direct:.2f} s, through the kernel "
          f"{through:.2f} s: overhead {overhead * 100:+.1f} % (goal <= 5 %)")


if __name__ == "__main__":
    main()

"""P0: a multi-turn agent fleet, against llama-cpp-python's own server in the same run and against the same-run
physical limit of a bare llama.cpp loop (docs/engine.md, "P0").

The workload: ``AGENTS`` agent processes, each holding a ``TURNS``-turn ``llm.chat`` conversation behind one
system prompt of ~500 tokens that every agent shares, ``MAX_TOKENS`` tokens an answer, temperature 0; every
turn re-sends the whole history.  Systems:

- ``server``: ``python -m llama_cpp.server`` on the same model (2 threads, ``n_ctx`` 2048; ``kernel.testing.
  LlamaServer``, its ``[server]`` extra in the test extra), with ``AGENTS`` concurrent
  HTTP clients making the same conversations over ``/v1/chat/completions``: it serves one request at a time and
  re-reads each history (it keeps only the previous request's prefix);
- ``per_agent``: aiosd with the secure default (``share_prefix = "agent"``: KV reused within an agent only);
- ``shared``: aiosd with the agents launched in one fleet and ``share_prefix = "fleet"`` (the system prompt's KV
  computed once and reused across the fleet).

The limit: the prompt tokens that must be computed (each agent's conversation once -- or, shared, the system
prompt once) at the bare loop's prefill speed, plus the generated tokens at its batched-decode speed, measured
in the same run (``bench.llm.BareLoop``).  Efficiency = limit / measured wall time.  ``AIOSD_P0_AGENTS`` and
``AIOSD_P0_TURNS`` shrink the workload for a quick look.
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import psutil

from bench.common import pct, save, start_kernel
from kernel import testing

AGENTS = int(os.environ.get("AIOSD_P0_AGENTS", 32))
TURNS = int(os.environ.get("AIOSD_P0_TURNS", 3))
MAX_TOKENS = 48
THREADS = 2
SYSTEM = ("You are the support assistant of a small city library. The library opens at nine in the morning and "
          "closes at six in the evening from Monday to Friday, and at one in the afternoon on Saturday; it is "
          "closed on Sunday. Members may borrow up to eight books at a time for three weeks, and renew each book "
          "twice unless another member has reserved it. Late books cost ten cents a day. The reading room on the "
          "first floor is quiet; the children's corner is on the ground floor next to the entrance. Printing "
          "costs five cents a page in black and white and twenty cents in colour. Wireless internet is free for "
          "everyone; the password is on the card at the front desk. Lost cards are replaced for two dollars. "
          "The library runs a book club on the first Thursday of each month, a story hour for children every "
          "Saturday morning, and a computer class for seniors on Tuesday afternoons. Meeting rooms can be booked "
          "up to two weeks ahead for groups of up to twelve people. Donations of recent books in good condition "
          "are welcome at the front desk. Answer every question politely, in one or two short sentences, using "
          "only these facts; if the facts do not say, say that you do not know and suggest asking at the front "
          "desk. ") * 2
TOPICS = ["opening hours", "late fees", "printing", "the book club", "meeting rooms", "lost cards", "story hour",
          "wireless internet", "renewals", "donations", "the reading room", "the computer class"]


def questions(agent: int) -> list[str]:
    """The ``TURNS`` user turns of agent ``agent`` (distinct across agents)."""
    return [f"Visitor {agent}, question {t + 1}: please tell me about {TOPICS[(agent + 3 * t) % len(TOPICS)]}."
            for t in range(TURNS)]


AGENT = """
import json, sys, time
from agentproc import llm
start, turns, max_tokens = float(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
system = sys.argv[4]
messages = [{"role": "system", "content": system}]
time.sleep(max(0.0, start - time.time()))
out = []
for q in turns:
    messages.append({"role": "user", "content": q})
    t = time.time()
    c = llm.chat(messages, max_tokens=max_tokens, temperature=0.0)
    out.append({"latency": time.time() - t, **c.usage})
    messages.append({"role": "assistant", "content": c.text})
print("RESULT", json.dumps({"turns": out, "end": time.time()}), flush=True)
"""

KERNEL_CONFIG = """
[kernel]
max_procs = {procs}
max_frame = 1048576

[llm]
n_ctx_seq = 2048
n_seq_max = {slots}
max_active = {active}
kv_size = {kv}
n_batch = 512
threads = {threads}
share_prefix = "{share}"
kv_layout = "{layout}"
"""


# ---- aiosd -------------------------------------------------------------------------------------------------

def run_aiosd(share: str, layout: str = "auto") -> dict:
    """The fleet on a fresh kernel; ``share``: "agent" (the default) or "fleet" (all agents in one fleet);
    ``layout``: ``[llm] kv_layout`` (auto: streams per agent, one pool when shared)."""
    kernel = start_kernel(KERNEL_CONFIG.format(procs=AGENTS + 8, slots=AGENTS + 8, active=min(AGENTS, 32),
                                               kv=32768, threads=THREADS, share=share,
                                               layout=layout))
    try:
        kproc = psutil.Process(kernel.popen.pid)
        cpu0 = sum(kproc.cpu_times()[:2])
        start = time.time() + 3 + 0.05 * AGENTS  # every agent spawned and connected first
        extra = {"fleet": "p0"} if share == "fleet" else {}
        agent_ids = [kernel.client.call("proc.spawn", {
            "source": AGENT, "name": f"p0-{i}", **extra,
            "argv": [str(start), json.dumps(questions(i)), str(MAX_TOKENS), SYSTEM]})["id"] for i in range(AGENTS)]
        turns, ends = [], []
        for agent_id in agent_ids:
            rec = kernel.wait(agent_id, timeout=3600)
            out = kernel.output(agent_id)
            assert rec["exit_status"] == 0 and "RESULT" in out, out[-2000:]
            got = json.loads(out.split("RESULT", 1)[1])
            turns.append(got["turns"])
            ends.append(got["end"])
        wall = max(ends) - start
        cpu = sum(kproc.cpu_times()[:2]) - cpu0
        status = kernel.client.call("sys.status")
    finally:
        kernel.stop()
    return dict(summarize(turns, wall, cpu, status.get("llm", {})), loop=status.get("loop", {}))


# ---- llama-cpp-python's server ----------------------------------------------------------------------------

def run_server(model_path: str) -> dict:
    server = testing.LlamaServer(model_path, threads=THREADS)  # its [server] extra is in the test extra
    proc = server.popen
    url = f"{server.base_url}/chat/completions"
    try:
        sproc = psutil.Process(proc.pid)
        cpu0 = sum(sproc.cpu_times()[:2])
        turns: list = [None] * AGENTS
        start = time.time() + 1

        def client(i: int) -> None:
            messages = [{"role": "system", "content": SYSTEM}]
            time.sleep(max(0.0, start - time.time()))
            out = []
            for q in questions(i):
                messages.append({"role": "user", "content": q})
                t = time.time()
                body = json.dumps({"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0}).encode()
                req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=7200) as r:
                    answer = json.loads(r.read())
                usage = answer["usage"]
                out.append({"latency": time.time() - t, "prompt_tokens": usage["prompt_tokens"],
                            "completion_tokens": usage["completion_tokens"], "cached_tokens": 0})
                messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            turns[i] = out

        threads = [threading.Thread(target=client, args=(i,)) for i in range(AGENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - start
        cpu = sum(sproc.cpu_times()[:2]) - cpu0
    finally:
        server.stop()
    return summarize(turns, wall, cpu, {})


# ---- figures ----------------------------------------------------------------------------------------------

def summarize(turns: list[list[dict]], wall: float, cpu: float, stats: dict) -> dict:
    flat = [t for agent in turns for t in agent]
    lat = [t["latency"] for t in flat]
    prompt = sum(t["prompt_tokens"] for t in flat)
    cached = sum(t.get("cached_tokens", 0) for t in flat)
    generated = sum(t["completion_tokens"] for t in flat)
    return {"wall_s": wall, "cpu_s": cpu, "turn_p50_s": pct(lat, 50), "turn_p99_s": pct(lat, 99),
            "prompt_tokens": prompt, "prompt_tokens_reused": cached, "prompt_tokens_computed": prompt - cached,
            "generated_tokens": generated, "tok_s": generated / wall, "turns": turns, "engine": stats}


def needed_prompt_tokens(turns: list[list[dict]], system_tokens: int, shared: bool) -> int:
    """The prompt tokens an ideal engine computes: each turn's new tokens only (a history's earlier turns and
    answers reused), and with ``shared`` the system prompt once for the fleet."""
    total = 0
    for agent in turns:
        seen = 0
        for t in agent:
            total += max(1, t["prompt_tokens"] - seen)
            seen = t["prompt_tokens"] + t["completion_tokens"]
    return total - (len(turns) - 1) * system_tokens if shared else total


def bare_speeds(model_path: str) -> dict:
    """The bare llama.cpp loop's prefill and batched-decode tokens/s at this fleet's batch size."""
    from bench.llm import BareLoop

    n = min(AGENTS, 32)
    loop = BareLoop(model_path, n, n_ctx_seq=1024, n_batch=512)
    try:
        loop.run([SYSTEM[:200]] * 2, 2)  # warm-up
        texts = [f"Visitor {i}. " + SYSTEM[: 600 + 7 * i] for i in range(n)]
        r = loop.run(texts, MAX_TOKENS)
        system_tokens = len(loop.tokenize(SYSTEM))
    finally:
        loop.close()
    return {"prefill_tok_s": r["prefill_tokens"] / r["prefill_s"], "decode_tok_s": r["decode_tokens"] / r["decode_s"],
            "batch": n, "system_tokens": system_tokens}


def main() -> dict:
    model_path = testing.model_path()
    t0 = time.time()
    print(f"P0: {AGENTS} agents x {TURNS} turns, {MAX_TOKENS} tokens an answer, one shared system prompt",
          flush=True)
    bare = bare_speeds(model_path)
    print(f"  bare loop: prefill {bare['prefill_tok_s']:.0f} tok/s, decode at batch {bare['batch']} "
          f"{bare['decode_tok_s']:.0f} tok/s", flush=True)
    res = {"agents": AGENTS, "turns": TURNS, "max_tokens": MAX_TOKENS, "threads": THREADS,
           "system_prompt_tokens": bare["system_tokens"], "bare_loop": bare}
    # per_agent and shared run the default layout (auto); the *_unified / *_streams runs the other one.
    systems = {"per_agent": lambda: run_aiosd("agent"), "shared": lambda: run_aiosd("fleet"),
               "per_agent_unified": lambda: run_aiosd("agent", "unified"),
               "shared_streams": lambda: run_aiosd("fleet", "streams"), "server": lambda: run_server(model_path)}
    chosen = os.environ.get("AIOSD_P0_SYSTEMS", ",".join(systems)).split(",")
    for name in chosen:
        r = systems[name]()
        shared = name.startswith("shared")
        need = needed_prompt_tokens(r["turns"], bare["system_tokens"], shared)
        limit = need / bare["prefill_tok_s"] + r["generated_tokens"] / bare["decode_tok_s"]
        r.update(needed_prompt_tokens=need, limit_s=limit, efficiency=limit / r["wall_s"])
        res[name] = {k: v for k, v in r.items() if k != "turns"}
        print(f"  {name}: wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.0f} s, turn p50/p99 {r['turn_p50_s']:.1f}/"
              f"{r['turn_p99_s']:.1f} s, prompt tokens computed {r['prompt_tokens_computed']} (reused "
              f"{r['prompt_tokens_reused']}), limit {limit:.1f} s, efficiency {r['efficiency']:.2f}", flush=True)
    res["wall_s"] = time.time() - t0
    res["cpu"] = _cpu_model()
    if {"per_agent", "shared", "server"} <= set(chosen):
        res["efficiency_per_agent"] = res["per_agent"]["efficiency"]
        res["efficiency_shared"] = res["shared"]["efficiency"]
        res["speedup_vs_server_per_agent"] = res["server"]["wall_s"] / res["per_agent"]["wall_s"]
        res["speedup_vs_server_shared"] = res["server"]["wall_s"] / res["shared"]["wall_s"]
        print(f"P0 {AGENTS} agents x {TURNS} turns: shared {res['shared']['wall_s']:.1f} s (efficiency "
              f"{res['efficiency_shared']:.2f}, goal >= 0.9), per agent {res['per_agent']['wall_s']:.1f} s "
              f"(efficiency {res['efficiency_per_agent']:.2f}) | llama_cpp.server {res['server']['wall_s']:.1f} s: "
              f"{res['speedup_vs_server_shared']:.2f}x / {res['speedup_vs_server_per_agent']:.2f}x faster",
              flush=True)
    save("p0" if set(chosen) >= set(systems) - {"per_agent_unified", "shared_streams"} else "p0_partial", res)
    return res


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()

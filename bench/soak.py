"""The soak: 64 agents make mixed syscalls and generations for 10 minutes against one kernel.

Each agent loops until its deadline: a generation (plain, streamed, chat, or streamed and cancelled half-way),
then a burst of ``sys.ping`` (timed), ``proc.self``, ``proc.logs`` of itself and a printed line.  Every call
has a deadline (``LOST_S``): a call with no answer by then counts as lost.  The agents report how many calls
they made, how many were answered (any code), the errors by code, and a sample of their ``sys.ping`` times.

Measured here: kernel RSS after warm-up (``WARMUP_FRACTION`` of the run) against the end (goal: within 5 %),
requests lost (goal: 0), ``sys.ping`` p50/p99 from inside the agents and from an operator outside them.
``AIOSD_SOAK_S`` shortens the run (e.g. 60 for a quick look); ``AIOSD_SOAK_AGENTS`` changes the fleet.
"""
from __future__ import annotations

import json
import os
import threading
import time

import psutil

from bench.common import median, pct, save, start_kernel

AGENTS = int(os.environ.get("AIOSD_SOAK_AGENTS", "64"))
DURATION_S = float(os.environ.get("AIOSD_SOAK_S", "600"))
WARMUP_FRACTION = 0.2
LOST_S = 300.0  # a call unanswered this long is lost (the engine serves 64 agents on 2 cores: be generous)
RSS_GOAL = 0.05

CONFIG = f"""
[kernel]
max_procs = {AGENTS + 8}

[llm]
n_ctx_seq = 512
n_seq_max = 32
max_active = 16
n_batch = 256
"""

AGENT = '''
import json, random, sys, time
from agentproc import client, errors
c = client.default()
deadline, lost_s = time.monotonic() + float(sys.argv[1]), float(sys.argv[2])
me = c.call("proc.self")["id"]
r = random.Random(me)
stats = {"calls": 0, "answered": 0, "lost": 0, "codes": {}, "generations": 0, "tokens": 0}
pings = []

def call(name, args=None, stream=False, cancel_after=None):
    stats["calls"] += 1
    try:
        if not stream:
            result = c.call(name, args, timeout=lost_s)
        else:
            s = c.stream(name, args, timeout=lost_s)
            for n, _ in enumerate(s):
                if cancel_after is not None and n == cancel_after:
                    call("llm.cancel", {"id": s.rid})
            result = s.result
        stats["codes"]["ok"] = stats["codes"].get("ok", 0) + 1
        stats["answered"] += 1
        return result
    except errors.ETIMEDOUT:
        stats["lost"] += 1
    except errors.SyscallError as e:
        stats["codes"][e.code] = stats["codes"].get(e.code, 0) + 1
        stats["answered"] += 1

PROMPTS = ("Once upon a time", "The capital of France is", "def fibonacci(n):", "A list of fruits: apple,")
while time.monotonic() < deadline:
    kind = r.choice(("generate", "stream", "chat", "cancel"))
    args = {"max_tokens": r.randint(4, 16), "temperature": r.choice((0.0, 0.8)), "seed": r.randint(0, 99)}
    if kind == "chat":
        res = call("llm.chat", dict(args, messages=[{"role": "user", "content": r.choice(PROMPTS)}]))
    else:
        res = call("llm.generate", dict(args, prompt=r.choice(PROMPTS)), stream=kind != "generate",
                   cancel_after=1 if kind == "cancel" else None)
    if res:
        stats["generations"] += 1
        stats["tokens"] += res["usage"]["completion_tokens"]
    for _ in range(r.randint(3, 8)):
        t = time.perf_counter()
        if call("sys.ping") is not None:
            pings.append(time.perf_counter() - t)
    call("proc.self")
    call("proc.logs", {"id": me})
    print("turn", stats["calls"], flush=True)
sample = r.sample(pings, min(len(pings), 400))
print("STATS", json.dumps(dict(stats, pings=[round(p, 5) for p in sample], n_pings=len(pings))), flush=True)
'''


class Sampler(threading.Thread):
    """Kernel RSS and operator ``sys.ping`` times, sampled every ``period`` seconds until ``stop``."""

    def __init__(self, kernel, period: float = 0.5):
        super().__init__(daemon=True)
        self.kernel, self.period = kernel, period
        self.proc = psutil.Process(kernel.popen.pid)
        self.client = kernel.new_client(timeout=LOST_S)
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self.pings: list[float] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.rss.append((time.monotonic() - self.t0, self.proc.memory_info().rss / 2**20))
            t = time.perf_counter()
            self.client.call("sys.ping")
            self.pings.append(time.perf_counter() - t)

    def rss_at(self, seconds: float) -> float:
        """The median RSS of the samples within 5 s after ``seconds`` (one sample can catch a passing peak)."""
        window = [mb for t, mb in self.rss if seconds <= t <= seconds + 5] or [self.rss[-1][1]]
        return median(window)


def main(agents: int = AGENTS, duration_s: float = DURATION_S) -> dict:
    kernel = start_kernel(CONFIG)
    try:
        sampler = Sampler(kernel)
        sampler.start()
        ids = [kernel.client.call("proc.spawn", {"source": AGENT, "name": f"soak-{i}",
                                                 "argv": [str(duration_s), str(LOST_S)]})["id"]
               for i in range(agents)]
        records = [kernel.wait(i, duration_s + LOST_S + 120) for i in ids]
        end_rss = sampler.rss_at(max(0.0, sampler.rss[-1][0] - 5))
        sampler.stop.set()
        sampler.join(LOST_S)
        outputs = [kernel.output(i) for i in ids]
        alive = kernel.client.call("sys.ping") == {"pong": True}
    finally:
        kernel.stop()
    return report(agents, duration_s, records, outputs, sampler, end_rss, alive)


def report(agents, duration_s, records, outputs, sampler, end_rss, alive) -> dict:
    stats = []
    for rec, out in zip(records, outputs):
        lines = [line for line in out.splitlines() if line.startswith("STATS ")]
        stats.append(json.loads(lines[-1][6:]) if lines else None)
    failed = [rec["id"] for rec, st in zip(records, stats) if st is None or rec.get("exit_status") != 0]
    ok = [s for s in stats if s]
    codes: dict = {}
    for s in ok:
        for code, n in s["codes"].items():
            codes[code] = codes.get(code, 0) + n
    pings = [p for s in ok for p in s["pings"]]
    warm_rss = sampler.rss_at(WARMUP_FRACTION * duration_s)
    result = {
        "agents": agents, "duration_s": duration_s, "agents_failed": failed, "kernel_alive": alive,
        "calls": sum(s["calls"] for s in ok), "answered": sum(s["answered"] for s in ok),
        "lost": sum(s["lost"] for s in ok), "codes": codes, "generations": sum(s["generations"] for s in ok),
        "tokens": sum(s["tokens"] for s in ok), "pings": sum(s["n_pings"] for s in ok),
        "agent_ping_p50_ms": round(1000 * pct(pings, 50), 2) if pings else None,
        "agent_ping_p99_ms": round(1000 * pct(pings, 99), 2) if pings else None,
        "operator_ping_p50_ms": round(1000 * pct(sampler.pings, 50), 2),
        "operator_ping_p99_ms": round(1000 * pct(sampler.pings, 99), 2),
        "rss_warm_mb": round(warm_rss, 1), "rss_end_mb": round(end_rss, 1),
        "rss_change": round(end_rss / warm_rss - 1, 4),
    }
    result["rss_ok"] = abs(result["rss_change"]) <= RSS_GOAL
    print(f"soak: {agents} agents x {duration_s:.0f} s: {result['calls']} calls, {result['lost']} lost, "
          f"{len(failed)} agents failed, {result['generations']} generations ({result['tokens']} tokens); "
          f"sys.ping p50/p99 {result['agent_ping_p50_ms']}/{result['agent_ping_p99_ms']} ms in the agents, "
          f"{result['operator_ping_p50_ms']}/{result['operator_ping_p99_ms']} ms from an operator; kernel RSS "
          f"{result['rss_warm_mb']} MiB after warm-up -> {result['rss_end_mb']} MiB "
          f"({100 * result['rss_change']:+.1f} %, goal within {100 * RSS_GOAL:.0f} %)")
    print("soak: answers by code:", json.dumps(codes, sort_keys=True))
    save("soak", result)
    return result


if __name__ == "__main__":
    main()

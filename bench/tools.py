"""Tool benchmarks (kernel/tools.py), each against a baseline measured in the same run.

1. Round trip of a trivial built-in tool (``calculator "1+1"``: the kernel, a queue, a warm worker and back)
   against the null syscall (``sys.ping``) from the same client, alternating rounds, medians of p50 (goal
   <= 3x: the worker hop stays cheap).
2. 20 callers at once on ``python`` (2 instances; a call sleeps 0.2 s) against 2 x the throughput of one caller
   alone, i.e. of one instance (goal: within 10 %).
"""
from __future__ import annotations

import threading
import time

from agentproc import tools
from bench.common import median, pct, save, start_kernel

ROUNDS = 5
CALLS = 300
SLEEP_CODE = "import time\ntime.sleep(0.2)"


def _latencies(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def round_trip(kernel) -> dict:
    c = kernel.client
    tools.call("calculator", expression="1+1", client=c)  # start its workers
    tool_p50, ping_p50 = [], []
    for _ in range(ROUNDS):
        tool_p50.append(pct(_latencies(lambda: tools.call("calculator", expression="1+1", client=c), CALLS), 50))
        ping_p50.append(pct(_latencies(lambda: c.call("sys.ping"), CALLS), 50))
    t, p = median(tool_p50), median(ping_p50)
    return {"tool_p50_us": round(t * 1e6), "ping_p50_us": round(p * 1e6), "ratio": round(t / p, 2)}


def throughput(kernel, callers: int = 20, calls_each: int = 2) -> dict:
    c = kernel.client
    t0 = time.perf_counter()
    for _ in range(5):
        tools.call("python", code=SLEEP_CODE, client=c)
    one = 5 / (time.perf_counter() - t0)  # calls/s of one instance, one caller at a time
    errors: list = []

    def caller():
        client = kernel.new_client(timeout=300)
        try:
            for _ in range(calls_each):
                tools.call("python", code=SLEEP_CODE, client=client)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    many = callers * calls_each / (time.perf_counter() - t0)
    return {"one_instance_calls_s": round(one, 2), "callers": callers, "calls_s": round(many, 2),
            "vs_2x_one": round(many / (2 * one), 3), "errors": len(errors)}


def main() -> dict:
    kernel = start_kernel()
    try:
        result = {"round_trip": round_trip(kernel), "instances": throughput(kernel)}
    finally:
        kernel.stop()
    rt, th = result["round_trip"], result["instances"]
    print(f"tools: calculator round trip p50 {rt['tool_p50_us']} us vs sys.ping {rt['ping_p50_us']} us: "
          f"{rt['ratio']}x (goal <= 3x)")
    print(f"tools: 20 callers on a 2-instance tool: {th['calls_s']} calls/s vs 2 x one instance "
          f"({th['one_instance_calls_s']} calls/s): {th['vs_2x_one']:.2f} (goal within 10 %), {th['errors']} errors")
    save("tools", result)
    return result


if __name__ == "__main__":
    main()

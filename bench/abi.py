"""ABI benchmarks (issue: foundation).

1. Null-syscall round trip: ``sys.ping`` through the real kernel vs a raw pyzmq + msgpack ROUTER/DEALER echo
   server doing the same decode/encode, both on ipc://, alternated in rounds; p50 and p99 in microseconds.
   Goal: kernel p50 <= 1.3x raw.
2. Agent spawn -> first syscall: ``proc.spawn`` of a program whose first line makes a syscall, timed from the
   spawn request until that syscall has returned in the agent (so the bootstrap's sandbox layers, connection
   and attestation are all included), vs ``python -c "import zmq"`` run to completion.
   Goal: <= 1.5x the bare interpreter.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

import msgpack
import zmq

from syscalls.address import operator_routing_id

from bench.common import median, pct, save, start_kernel

ROUNDS = 9
PINGS_PER_ROUND = 1500
SPAWNS = 10


def _raw_server(endpoint: str, ready) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind(endpoint)
    ready.set()
    while True:
        rid, frame = sock.recv_multipart()
        req = msgpack.unpackb(frame)
        if req["call"] == "exit":
            break
        sock.send_multipart([rid, msgpack.packb({"v": 1, "id": req["id"], "ok": True, "result": {"pong": True}})])
    sock.close()
    ctx.term()


def _ping_round(sock, n: int) -> list[float]:
    """n msgpack pings over ``sock``; per-ping round trip in microseconds."""
    out = []
    for i in range(n):
        t0 = time.perf_counter_ns()
        sock.send(msgpack.packb({"v": 1, "id": i, "call": "sys.ping"}))
        reply = msgpack.unpackb(sock.recv())
        out.append((time.perf_counter_ns() - t0) / 1000)
        assert reply["ok"], reply
    return out


def _dealer(ctx, endpoint):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    rid = operator_routing_id(endpoint)  # the kernel's operator credential; None for the raw echo server
    if rid is not None:
        s.setsockopt(zmq.ROUTING_ID, rid)
    s.connect(endpoint)
    return s


def round_trip(kernel) -> dict:
    tmp = tempfile.mkdtemp(prefix="aiosd-raw-")
    raw_ep = f"ipc://{tmp}/raw.sock"
    ready = mp.Event()
    server = mp.Process(target=_raw_server, args=(raw_ep, ready), daemon=True)
    server.start()
    ready.wait(10)
    ctx = zmq.Context()
    raw, ker = _dealer(ctx, raw_ep), _dealer(ctx, kernel.endpoint)
    _ping_round(raw, 500), _ping_round(ker, 500)  # warm up
    sdk = kernel.new_client()
    raw_p50, raw_p99, ker_p50, ker_p99, sdk_p50 = [], [], [], [], []
    for _ in range(ROUNDS):
        r = _ping_round(raw, PINGS_PER_ROUND)
        k = _ping_round(ker, PINGS_PER_ROUND)
        s = []
        for _ in range(PINGS_PER_ROUND):
            t0 = time.perf_counter_ns()
            sdk.call("sys.ping")
            s.append((time.perf_counter_ns() - t0) / 1000)
        raw_p50.append(pct(r, 50)), raw_p99.append(pct(r, 99))
        ker_p50.append(pct(k, 50)), ker_p99.append(pct(k, 99)), sdk_p50.append(pct(s, 50))
    raw.send(msgpack.packb({"v": 1, "id": 0, "call": "exit"}))
    server.join(5)
    raw.close(), ker.close()
    ctx.term()
    res = {
        "raw_p50_us": median(raw_p50), "raw_p99_us": median(raw_p99),
        "kernel_p50_us": median(ker_p50), "kernel_p99_us": median(ker_p99),
        "kernel_sdk_p50_us": median(sdk_p50),
    }
    # Each round measures raw, kernel and SDK back to back; the median of per-round ratios resists the
    # machine's noise better than a ratio of medians.
    res["ratio_p50"] = median([k / r for k, r in zip(ker_p50, raw_p50)])
    res["ratio_p99"] = median([k / r for k, r in zip(ker_p99, raw_p99)])
    res["ratio_sdk_p50"] = median([k / r for k, r in zip(sdk_p50, raw_p50)])
    res["rounds"], res["pings_per_round"] = ROUNDS, PINGS_PER_ROUND
    res["goal_ratio_p50"] = 1.3
    return res


PLAIN_AGENT = "import time\nfrom agentproc import ping\nping()\nprint(time.time())\n"
# An agent written for the openai package: the import and a client made before its first request.
OPENAI_AGENT = "import time\nfrom openai import OpenAI\nOpenAI()\nfrom agentproc import ping\nping()\nprint(time.time())\n"


def _spawn_to_syscall(kernel, source: str) -> float:
    """Seconds from proc.spawn until the program's own first syscall has returned in the agent."""
    t0 = time.time()
    pid_ = kernel.spawn(source)["id"]
    kernel.wait(pid_, timeout=60)
    return float(kernel.output(pid_).split()[0]) - t0


def spawn_latency(kernel) -> dict:
    """Agent start against ``python -c 'import zmq'``, and what importing openai adds (alternating rounds)."""
    bare, ours, with_openai = [], [], []
    for _ in range(SPAWNS):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import zmq"], check=True)
        bare.append(time.perf_counter() - t0)
        ours.append(_spawn_to_syscall(kernel, PLAIN_AGENT))
        with_openai.append(_spawn_to_syscall(kernel, OPENAI_AGENT))
    res = {"bare_import_zmq_ms": median(bare) * 1000, "spawn_to_first_syscall_ms": median(ours) * 1000,
           "openai_agent_first_syscall_ms": median(with_openai) * 1000}
    res["ratio"] = median([o / b for o, b in zip(ours, bare)])
    res["openai_import_ms"] = median([w - o for w, o in zip(with_openai, ours)]) * 1000
    res["goal_ratio"] = 1.5
    return res


def main() -> dict:
    kernel = start_kernel()
    try:
        res = {"round_trip": round_trip(kernel), "spawn": spawn_latency(kernel)}
    finally:
        kernel.stop()
    save("abi", res)
    rt, sp = res["round_trip"], res["spawn"]
    print(f"null syscall round trip: kernel p50 {rt['kernel_p50_us']:.1f} us p99 {rt['kernel_p99_us']:.1f} us | "
          f"raw pyzmq+msgpack p50 {rt['raw_p50_us']:.1f} us p99 {rt['raw_p99_us']:.1f} us | "
          f"ratio p50 {rt['ratio_p50']:.2f}x p99 {rt['ratio_p99']:.2f}x (goal <= 1.3x); "
          f"through the SDK p50 {rt['kernel_sdk_p50_us']:.1f} us ({rt['ratio_sdk_p50']:.2f}x)")
    print(f"agent spawn -> first syscall: {sp['spawn_to_first_syscall_ms']:.1f} ms | python -c 'import zmq': "
          f"{sp['bare_import_zmq_ms']:.1f} ms | ratio {sp['ratio']:.2f}x (goal <= 1.5x); an agent importing openai: "
          f"{sp['openai_agent_first_syscall_ms']:.1f} ms (+{sp['openai_import_ms']:.0f} ms)")
    return res


if __name__ == "__main__":
    main()

"""The ABI fuzzer: a hostile agent sends the kernel malformed and random frames (bench/fuzzgen.py) and the kernel
must answer every one without crashing, without ``EIO`` (a kernel bug), and without growing.

``fuzz(kernel, count, seed)`` runs one fuzzer agent on a running kernel while sampling the kernel's RSS, and
returns the agent's tally plus the RSS figures; tests/escape/test_fuzz.py runs a short one in ``make test``,
``main()`` a long one (>= 100k frames) in ``make bench``.

The fuzzer runs sandboxed like any agent of the default group, with a syscall rate high enough that the rate
limit is not what answers most frames.  Kernel RSS is sampled after warm-up (a tenth of the frames sent: the
caches, the engine's first grammars and the ZeroMQ buffers are allocated by then) and at the end.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil

from bench.common import save, start_kernel

GENERATOR = Path(__file__).resolve().parent / "fuzzgen.py"
FUZZ_RATE = 10_000_000  # syscalls/s: the rate limit must not be what answers the frames

DRIVER = '''
import json, sys
from agentproc import client, proc
seed, count, max_frame = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
frames = Frames(seed, max_frame, proc.self()["id"])
summary = drive(client.default().sock, frames, count, progress_every=max(1, count // 10))
print("SUMMARY", json.dumps(summary), flush=True)
'''


def agent_source() -> str:
    """The fuzzer agent's program: the generator (standard library and msgpack only) and its driver."""
    return GENERATOR.read_text() + DRIVER


def _progress(kernel, agent_id: int) -> int:
    """Frames the fuzzer has sent so far, from its last ``PROGRESS n`` line (0 before the first)."""
    out = kernel.output(agent_id)
    lines = [line for line in out.splitlines() if line.startswith("PROGRESS ")]
    return int(lines[-1].split()[1]) if lines else 0


def fuzz(kernel, count: int, seed: int = 1, *, max_frame: int = 65536, timeout: float = 600,
         warmup: float = 0.1) -> dict:
    """Run one fuzzer agent of ``count`` frames on ``kernel`` (a ``KernelProc``) and wait for it.

    Returns the agent's tally (bench/fuzzgen.py ``Tally.summary``) with ``rss_warm_mb`` (kernel RSS once
    ``warmup`` of the frames are sent), ``rss_end_mb``, ``rss_peak_mb``, ``rss_curve`` (RSS at each tenth)
    and the agent's final ``record``.  Raises
    ``AssertionError`` when the kernel dies, or the agent does not finish in ``timeout`` seconds (it is killed).
    """
    kproc = psutil.Process(kernel.popen.pid)
    rec = kernel.client.call("proc.spawn", {
        "source": agent_source(), "name": f"fuzzer-{seed}", "argv": [str(seed), str(count), str(max_frame)],
        "limits": {"syscall_rate": FUZZ_RATE}})
    agent_id = rec["id"]
    deadline = time.monotonic() + timeout
    warm = peak = 0.0
    curve: dict[int, float] = {}  # kernel RSS (MiB) when the fuzzer reported n frames sent, every tenth
    while True:
        assert kernel.popen.poll() is None, f"the kernel died ({kernel.popen.returncode}):\n{kernel.log()}"
        rss = kproc.memory_info().rss / 2**20
        peak = max(peak, rss)
        sent = _progress(kernel, agent_id)
        curve.setdefault(sent, round(rss, 1))
        if not warm and sent >= warmup * count:
            warm = rss
        rec = kernel.record(agent_id)
        if rec["state"] in ("EXITED", "KILLED"):
            break
        if time.monotonic() > deadline:
            kernel.client.call("proc.kill", {"id": agent_id})
            raise AssertionError(f"the fuzzer did not finish in {timeout} s: {kernel.output(agent_id)[-2000:]}")
        time.sleep(0.2)
    out = kernel.output(agent_id)
    lines = [line for line in out.splitlines() if line.startswith("SUMMARY ")]
    assert lines and rec["exit_status"] == 0, f"the fuzzer failed: {rec}\n{out[-3000:]}"
    summary = json.loads(lines[-1][len("SUMMARY "):])
    end = kproc.memory_info().rss / 2**20
    return dict(summary, rss_warm_mb=round(warm or end, 1), rss_end_mb=round(end, 1),
                rss_peak_mb=round(max(peak, end), 1), rss_curve=curve, record=rec)


WARMUP_FRAMES = 20_000  # the kernel's RSS climbs over the first ~14k frames (first use of each path), then is flat


def main(count: int = 120_000, seed: int = 7) -> dict:
    """``make bench``: a warm-up round, then a long fuzz run; zero crashes, zero EIO, kernel RSS at the end
    against its start."""
    kernel = start_kernel()
    try:
        warm = fuzz(kernel, WARMUP_FRAMES, seed + 1, timeout=3600)
        assert warm["eio"] == 0, warm["eio_samples"]
        result = fuzz(kernel, count, seed, timeout=3600, warmup=0.0)
        alive = kernel.client.call("sys.ping") == {"pong": True}
    finally:
        kernel.stop()
    result.pop("record")
    growth = result["rss_end_mb"] / max(result["rss_warm_mb"], 1e-9)
    print(f"fuzz: {result['sent']} frames in {result['seconds']:.0f} s ({result['frames_per_s']:.0f}/s), "
          f"{result['answered']} answered, EIO {result['eio']}, kernel alive {alive}; kernel RSS "
          f"{result['rss_warm_mb']:.0f} MiB after a {WARMUP_FRAMES}-frame warm-up -> {result['rss_end_mb']:.0f} MiB "
          "at the end "
          f"({growth:.3f}x, peak {result['rss_peak_mb']:.0f} MiB)")
    print("fuzz: answers by code:", json.dumps(result["codes"], sort_keys=True))
    save("fuzz", dict(result, kernel_alive=alive, rss_growth=round(growth, 4)))
    return result


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))

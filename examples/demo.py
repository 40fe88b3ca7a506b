"""``make run``: start a kernel on the default model, run the example agents at once, print a summary.

Each agent is its own OS process, started through the kernel; each prints its prompt and the model's answer.
The summary line counts agents, generated tokens and aggregate tokens per second.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from kernel.testing import KernelProc  # noqa: E402  (the same launcher the tests use)

DEMO_CONFIG = """
[llm]
n_ctx_seq = 1024
n_seq_max = 8
"""


def main() -> int:
    agents = sorted((HERE / "agents").glob("*.py"))
    base = Path(os.environ.get("AIOSD_RUNTIME_DIR") or tempfile.mkdtemp(prefix="aiosd-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    print(f"starting aiosd (runtime dir {base / 'run'}) ...", flush=True)
    kernel = KernelProc(base, DEMO_CONFIG)
    try:
        t0 = time.perf_counter()
        ids = {kernel.spawn(p.read_text(), name=p.stem)["id"]: p.stem for p in agents}
        print(f"started {len(ids)} agents at once: {', '.join(ids.values())}\n", flush=True)
        records = {pid_: kernel.wait(pid_, timeout=300) for pid_ in ids}
        wall = time.perf_counter() - t0
        tokens = 0
        for pid_, rec in records.items():
            out = kernel.output(pid_)
            print(f"=== agent {pid_} ({ids[pid_]}, pid {rec['pid']}): {rec['state']} status {rec['exit_status']}")
            print(out.rstrip() + "\n")
            tokens += rec["usage"]["completion_tokens"]
        failed = [ids[i] for i, r in records.items() if r["exit_status"] != 0]
        print(f"summary: {len(ids)} agents, {tokens} tokens generated in {wall:.1f} s, "
              f"{tokens / wall:.1f} tokens/s aggregate" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    finally:
        kernel.stop()


if __name__ == "__main__":
    raise SystemExit(main())

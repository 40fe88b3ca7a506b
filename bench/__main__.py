"""``make bench``: run every benchmark, print its ratios, write bench/results.json.

``python -m bench NAME...`` runs only the named ones (p0, abi, llm, storage, memory, tools, fuzz, soak, kvlayout, remote)."""
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the kernel runs (kernel/main.py), before numpy loads

from bench import abi, fleet, fuzz, kvlayout, llm, memory, remote, soak, storage, tools

ALL = {"p0": fleet.main, "abi": abi.main, "llm": llm.main, "storage": storage.main, "memory": memory.main, "tools": tools.main,
       "fuzz": fuzz.main, "soak": soak.main, "kvlayout": kvlayout.main, "remote": remote.main}

if __name__ == "__main__":
    for name in sys.argv[1:] or ALL:
        ALL[name]()

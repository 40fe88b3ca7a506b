"""``make bench``: run every benchmark, print its ratios, write bench/results.json.

``python -m bench NAME...`` runs only the named ones (abi, llm, fuzz, soak)."""
import sys

from bench import abi, fuzz, llm, soak

ALL = {"abi": abi.main, "llm": llm.main, "fuzz": fuzz.main, "soak": soak.main}

if __name__ == "__main__":
    for name in sys.argv[1:] or ALL:
        ALL[name]()

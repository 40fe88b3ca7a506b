"""``make bench``: run every benchmark, print its ratios, write bench/results.json."""
from bench import abi, llm

if __name__ == "__main__":
    abi.main()
    llm.main()

"""``make bench``: run every benchmark, print its ratios, write bench/results.json."""
from bench import abi

if __name__ == "__main__":
    abi.main()

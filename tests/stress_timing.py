"""Run the timing tests (pytest -m timing) N times in a row while every CPU is kept busy.

CONVENTIONS, "Timing in tests": a timing assertion must hold on a loaded 2-core machine. This is the check to run
before landing one: `make stress-timing` (or `python tests/stress_timing.py 20 -k NAME` for a single test).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys


def _spin() -> None:
    while True:
        pass


def main(argv: list[str]) -> int:
    rounds = int(argv[0]) if argv and argv[0].isdigit() else 20
    extra = argv[1:] if argv and argv[0].isdigit() else argv
    burners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 2)]
    for burner in burners:
        burner.start()
    try:
        for round_no in range(1, rounds + 1):
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "timing",
                                   *extra], check=False)
            print(f"stress-timing: round {round_no}/{rounds}: exit {done.returncode}", flush=True)
            if done.returncode != 0:
                return done.returncode
        print(f"stress-timing: {rounds} rounds passed with {len(burners)} CPU(s) kept busy")
        return 0
    finally:
        for burner in burners:
            burner.terminate()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Benchmark: ``vlsft print-args`` end to end (interpreter start, imports, config, plan, output).

    .venv/bin/python benchmarks/print_args_bench.py                    # configs/demo.yaml, demo-lora.yaml; 3 runs
    .venv/bin/python benchmarks/print_args_bench.py --runs 5 --config configs/qwen2.5-vl-7b.yaml

Each run is a fresh ``python -m vlsft print-args --config CONFIG`` subprocess with its output discarded;
reported: the median wall time, the median CPU time (user + system), and the number of modules the command
imports (``sys.modules`` at exit: a count that does not depend on the machine's load). Bytecode caches are warmed
by one untimed run first (as after ``pip install``). Target (issue 23 item 5): <= 0.25 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGET_S = 0.25
COUNT = ("import sys, runpy; sys.argv = ['vlsft'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('vlsft', run_name='__main__')\nexcept SystemExit:\n    pass\n"
         "sys.stderr.write('MODULES %d\\n' % len(sys.modules))")


def one_run(config: str, env: dict) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "vlsft", "print-args", "--config", config], capture_output=True,
                       env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"print-args failed ({r.returncode}): {r.stderr.decode()[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def modules(config: str, env: dict) -> int:
    r = subprocess.run([sys.executable, "-c", COUNT, "print-args", "--config", config], capture_output=True,
                       text=True, env=env)
    return int(next(x for x in r.stderr.splitlines() if x.startswith("MODULES ")).split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", action="append", default=None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # cached bytecode, as installed
    for config in args.config or ["configs/demo.yaml", "configs/demo-lora.yaml"]:
        one_run(config, env)  # warm the bytecode caches and the page cache
        runs = [one_run(config, env) for _ in range(args.runs)]
        wall = statistics.median(w for w, _ in runs)
        print(json.dumps({"config": config, "median_wall_s": round(wall, 3),
                          "median_cpu_s": round(statistics.median(c for _, c in runs), 3),
                          "runs_s": [round(w, 3) for w, _ in runs], "modules": modules(config, env),
                          "target_met": wall <= TARGET_S, "load": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()

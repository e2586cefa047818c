"""Benchmark: ``vlsft datasets check --deep`` on a generated 1,000,000-sample dictionary with real media files.

    .venv/bin/python benchmarks/bench_check.py                    # 1M samples, 4,000 media files, best of 3
    .venv/bin/python benchmarks/bench_check.py --samples 200000 --runs 1

Generates (in a temporary folder, removed afterwards unless --keep) a dataset dictionary with two
datasets: a 900,000-line JSONL (single images, multi-image samples, videos, 10 % text-only) and a
100,000-sample .json list, both referencing a few thousand real files spread over 40 folders (hard
links to one tiny file). Then runs the real command end to end in a subprocess (interpreter start,
imports, parsing, every per-sample check, existence of every referenced file) and reports samples/s.

The official ``tools/check_image.py`` does 28,000 samples/s on the 2-core development machine
(DESIGN.md §6); the target is >= 280,000 samples/s (1M samples in < 4 s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the same media tree as deep_check_bench (run as benchmarks/bench_check.py: its folder is on sys.path)
from deep_check_bench import media_files

OFFICIAL_SAMPLES_PER_S = 28_000
TARGET_SAMPLES_PER_S = 280_000


def generate(root: Path, samples: int, files: int, json_share: float = 0.1) -> Path:
    images, videos = media_files(root, files)
    q = "Describe this image in detail."
    a = "A photo of a cat sitting on a red sofa next to a window, with a plant on the left."

    def record(k: int) -> dict:
        kind = k % 10
        if kind == 0:
            return {"id": k, "conversations": [{"from": "human", "value": "What is the capital of France?"},
                                               {"from": "gpt", "value": "Paris."}]}
        if kind == 1:
            return {"id": k, "video": videos[k % len(videos)],
                    "conversations": [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": a}]}
        if kind == 2:
            pair = [images[k % len(images)], images[(k * 7 + 3) % len(images)]]
            return {"id": k, "image": pair, "conversations": [
                {"from": "human", "value": "<image>\n<image>\nCompare them."}, {"from": "gpt", "value": a},
                {"from": "human", "value": "Which is brighter?"}, {"from": "gpt", "value": "The first."}]}
        return {"id": k, "image": images[k % len(images)],
                "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}

    n_json = int(samples * json_share)
    n_jsonl = samples - n_json
    with open(root / "train.jsonl", "w") as f:
        dumps = json.dumps
        for start in range(0, n_jsonl, 10_000):
            f.write("".join(dumps(record(k)) + "\n" for k in range(start, min(n_jsonl, start + 10_000))))
    (root / "extra.json").write_text(json.dumps([record(n_jsonl + k) for k in range(n_json)]))
    dictionary = root / "Dataset-Dictionary.json"
    dictionary.write_text(json.dumps({
        "train": {"data_path": "media", "annotation_path": "train.jsonl", "length": n_jsonl, "sampling_rate": 0.5},
        "extra": {"data_path": "media", "annotation_path": "extra.json", "length": n_json, "repeat_time": 2},
    }, indent=2))
    return dictionary


def run_check(dictionary: Path, workers: int | None = None) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (user+sys of the command and its workers) and the --json report."""
    cmd = [sys.executable, "-m", "vlsft", "datasets", "check", str(dictionary), "--deep", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    env = dict(os.environ)
    if workers:
        env["VLSFT_CHECK_WORKERS"] = str(workers)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=dictionary.parent)  # (PYTHONPATH=OTHER/src:OTHER
    # from outside the repository times another checkout: the repository as the working folder would shadow it)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"check failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall, cpu, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--files", type=int, default=4_000, help="distinct media files (images + 10 %% videos)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--workers", type=int, default=None, help="processes for the scan (default: one per CPU)")
    ap.add_argument("--keep", type=Path, default=None, help="generate into this folder and keep it")
    args = ap.parse_args()

    root = (args.keep or Path(tempfile.mkdtemp(prefix="vlsft-bench-check-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        stamp = root / f".generated-{args.samples}-{args.files}"
        if args.keep is not None and stamp.exists():
            dictionary = root / "Dataset-Dictionary.json"  # reuse what an earlier --keep run generated
        else:
            if args.keep is not None:
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
            dictionary = generate(root, args.samples, args.files)
            stamp.touch()
        gen_s = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in root.glob("*.json*")) / 1e6
        print(f"generated {args.samples:,} samples ({size_mb:.0f} MB of annotations), {args.files:,} media files "
              f"in {gen_s:.1f} s", flush=True)
        walls = []
        cpus = []
        report: dict = {}
        for i in range(args.runs):
            load = os.getloadavg()[0]
            wall, cpu, report = run_check(dictionary, args.workers)
            walls.append(wall)
            cpus.append(cpu)
            print(f"run {i + 1}: {wall:.2f} s = {args.samples / wall:,.0f} samples/s (CPU {cpu:.2f} s; "
                  f"machine load before the run {load:.2f})", flush=True)
        best = min(walls)
        checked = sum(d["images"] + d["text_only"] + d["videos"] for d in report["datasets"])
        result = {
            "samples": args.samples,
            "media_files": args.files,
            "best_s": round(best, 3),
            "samples_per_s": round(args.samples / best),
            "runs_s": [round(w, 3) for w in walls],
            "cpu_s": [round(c, 3) for c in cpus],
            "vs_official": round(args.samples / best / OFFICIAL_SAMPLES_PER_S, 1),
            "target_met": args.samples / best >= TARGET_SAMPLES_PER_S,
            "problems": len(report["problems"]),
            "counted_media_refs": checked,
            "cpus": os.cpu_count(),
            "workers": args.workers or "auto",
        }
        print(json.dumps(result))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

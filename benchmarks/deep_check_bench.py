"""Benchmark: ``vlsft datasets check --deep`` per record shape (official, messages, sharegpt, prompt_completion,
parquet), end to end in a subprocess (interpreter start, imports, parsing, every check, media existence).

    .venv/bin/python benchmarks/deep_check_bench.py                           # every shape, 3 runs each
    .venv/bin/python benchmarks/deep_check_bench.py --shapes official --samples 1000000 --keep /tmp/dcb
    .venv/bin/python benchmarks/deep_check_bench.py --profile messages        # cProfile of one in-process scan

Each shape is one dataset dictionary over one annotation file of ``--samples`` records (single images, image
pairs, videos, 10 % text-only, as ``bench_check.py``) referencing ``--files`` real files (hard links to one tiny
file). The parquet shape holds the messages records (image paths as strings) in a parquet file. Reported: the
median wall time of ``--runs`` runs, samples/s, the CPU time (the command and its forked workers).
Targets (issue 23 item 5): official >= 500,000 samples/s, every other shape >= 100,000 samples/s. The command runs
in the data folder, so ``PYTHONPATH=OTHER/src:OTHER`` times another checkout (before / after on one machine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = ("official", "messages", "sharegpt", "prompt_completion", "parquet")
TARGETS = {"official": 500_000}
OTHER_TARGET = 100_000
Q = "Describe this image in detail."
A = "A photo of a cat sitting on a red sofa next to a window, with a plant on the left."


def media_files(root: Path, files: int) -> tuple[list[str], list[str]]:
    """``files`` hard links in 40 folders under root/media: (images, videos), relative to it."""
    media = root / "media"
    folders = 40
    names = []
    for i in range(files):
        sub = media / f"d{i % folders:02d}"
        seed = root / f"seed{i % folders:02d}.jpg"  # one seed per folder: file systems cap links per inode
        if i < folders:
            sub.mkdir(parents=True, exist_ok=True)
            seed.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 60)
        name = f"img_{i:06d}.jpg" if i % 10 else f"clip_{i:06d}.mp4"
        os.link(seed, sub / name)
        names.append(f"d{i % folders:02d}/{name}")
    return [p for p in names if p.endswith(".jpg")], [p for p in names if p.endswith(".mp4")]


def _media_of(k: int, images: list[str], videos: list[str]) -> tuple[list[str], list[str], str]:
    """(images, videos, the question's tags) of record k: 10 % text-only, 10 % video, 10 % pairs, else one."""
    kind = k % 10
    if kind == 0:
        return [], [], ""
    if kind == 1:
        return [], [videos[k % len(videos)]], "<video>"
    if kind == 2:
        return [images[k % len(images)], images[(k * 7 + 3) % len(images)]], [], "<image><image>"
    return [images[k % len(images)]], [], "<image>"


def record(shape: str, k: int, images: list[str], videos: list[str]) -> dict:
    imgs, vids, tags = _media_of(k, images, videos)
    if shape == "official":
        rec: dict = {"id": k}
        if imgs:
            rec["image"] = imgs[0] if len(imgs) == 1 else imgs
        if vids:
            rec["video"] = vids[0]
        rec["conversations"] = [{"from": "human", "value": tags.replace("><", ">\n<") + ("\n" if tags else "") + Q},
                                {"from": "gpt", "value": A}]
        return rec
    if shape in ("messages", "parquet"):
        rec = {"messages": [{"role": "user", "content": tags + Q}, {"role": "assistant", "content": A}]}
    elif shape == "sharegpt":
        rec = {"conversations": [{"from": "human", "value": tags + Q}, {"from": "gpt", "value": A}]}
    else:
        rec = {"prompt": [{"role": "user", "content": tags + Q}], "completion": [{"role": "assistant", "content": A}]}
    rec["images"] = imgs
    if vids:
        rec["videos"] = vids
    return rec


def generate(root: Path, shape: str, samples: int, images: list[str], videos: list[str]) -> Path:
    rows = (record(shape, k, images, videos) for k in range(samples))
    if shape == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        ann = root / f"{shape}.parquet"
        writer = None
        batch: list[dict] = []
        for k, r in enumerate(rows, 1):
            r.setdefault("videos", [])
            batch.append(r)
            if len(batch) == 50_000 or k == samples:
                table = pa.Table.from_pylist(batch)
                writer = writer or pq.ParquetWriter(ann, table.schema)
                writer.write_table(table)
                batch = []
        if writer is not None:
            writer.close()
    else:
        ann = root / f"{shape}.jsonl"
        with open(ann, "w") as f:
            for start in range(0, samples, 10_000):
                f.write("".join(json.dumps(next(rows)) + "\n" for _ in range(min(10_000, samples - start))))
    dictionary = root / f"dict-{shape}.json"
    entry = {"data_path": "media", "annotation_path": ann.name}
    if shape in ("sharegpt",):
        entry["format"] = "sharegpt"
    dictionary.write_text(json.dumps({shape: entry}, indent=2))
    return dictionary


def run_check(dictionary: Path) -> tuple[float, float, dict]:
    """Wall seconds, CPU seconds (the command and its workers), the --json report."""
    cmd = [sys.executable, "-m", "vlsft", "datasets", "check", str(dictionary), "--deep", "--json"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=dictionary.parent)  # (not the repository: a
    wall = time.perf_counter() - t0  # PYTHONPATH=other/src:other then times that checkout's vlsft and qwenvl)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"check failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall, cpu, json.loads(r.stdout)


def profile(dictionary: Path) -> None:
    import cProfile
    import pstats

    from qwenvl.data.annotation_check import scan
    from qwenvl.data.dictionary import load_dictionary

    d = load_dictionary(str(dictionary))
    spec = d.datasets[d.names[0]]
    cProfile.runctx("scan(spec.annotation_path, spec.data_path, deep=True, workers=1, fmt=spec.format_spec)",
                    globals(), {"scan": scan, "spec": spec}, str(dictionary) + ".prof")
    pstats.Stats(str(dictionary) + ".prof").sort_stats("tottime").print_stats(20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, of " + ", ".join(SHAPES))
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--files", type=int, default=4_000)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per shape; the median is reported")
    ap.add_argument("--keep", type=Path, default=None, help="generate into this folder and keep it (reused)")
    ap.add_argument("--profile", default=None, help="cProfile one in-process scan of this shape instead")
    args = ap.parse_args()
    shapes = [args.profile] if args.profile else args.shapes.split(",")
    root = (args.keep or Path(tempfile.mkdtemp(prefix="vlsft-deep-bench-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    try:
        if not (root / "media").exists():
            media_files(root, args.files)
        images = sorted(str(p.relative_to(root / "media")) for p in (root / "media").rglob("*.jpg"))
        videos = sorted(str(p.relative_to(root / "media")) for p in (root / "media").rglob("*.mp4"))
        results = []
        for shape in shapes:
            stamp = root / f".generated-{shape}-{args.samples}"
            dictionary = root / f"dict-{shape}.json"
            if not stamp.exists():
                dictionary = generate(root, shape, args.samples, images, videos)
                stamp.touch()
            if args.profile:
                profile(dictionary)
                return
            walls, cpus = [], []
            for _ in range(args.runs):
                wall, cpu, report = run_check(dictionary)
                walls.append(wall)
                cpus.append(cpu)
                if report["problems"]:
                    raise SystemExit(f"{shape}: unexpected problems {report['problems'][:3]}")
            med = statistics.median(walls)
            rate = args.samples / med
            results.append({"shape": shape, "samples": args.samples, "median_s": round(med, 3),
                            "samples_per_s": round(rate), "runs_s": [round(w, 3) for w in walls],
                            "cpu_s": [round(c, 3) for c in cpus],
                            "target_met": rate >= TARGETS.get(shape, OTHER_TARGET)})
            print(json.dumps(results[-1]), flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Data-pipeline benchmark: samples/s of one worker, and padding with / without packing.

    .venv/bin/python benchmarks/bench_data.py                 # ~1 min on a 2-core box
    .venv/bin/python benchmarks/bench_data.py --samples 400 --json

1. ``__getitem__`` throughput in one process (= one DataLoader worker) through the trainer's real
   path (``make_data_module`` -> ``SupervisedDataset``): JPEGs from 640x480 to 1920x1080, one image
   per sample, 10 % text-only samples, ``max_pixels`` 1280*28*28 (the official benchmark's mix;
   the official ``__getitem__`` runs at 2.30 samples/s on the same machine kind).
2. Real-token fraction of padded batches (8 samples per row group) vs online packing (32 samples
   per step into rows of at most 8192 tokens) on a realistic length mix: image SFT at that pixel
   budget (64..1280 image tokens + log-normal text), 10 % text only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_media(root: Path, n_images: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (800, 600), (1024, 768), (1280, 720), (1600, 900), (1920, 1080)]
    names = []
    for i in range(n_images):
        w, h = sizes[i % len(sizes)]
        # smooth gradients + noise + blocks: JPEG-decodes like a photo, not like a flat colour
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1)
        base += rng.normal(0, 18, (h, w, 3))
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 50), rng.integers(0, h - 50)
            base[y0:y0 + rng.integers(20, h // 3), x0:x0 + rng.integers(20, w // 3)] = rng.integers(0, 255, 3)
        name = f"img_{i:03d}.jpg"
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(root / name, quality=90)
        names.append(name)
    return names


def make_annotations(path: Path, images: list[str], n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q = "Describe the picture in detail, including colours and shapes." * rng.randint(1, 3)
            a = "The picture shows " + "a coloured region and some texture, " * rng.randint(2, 20) + "done."
            if i % 10 == 9:
                rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            else:
                rec = {"image": images[i % len(images)],
                       "conversations": [{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": a}]}
            f.write(json.dumps(rec) + "\n")


def bench_getitem(n_samples: int, n_images: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from qwenvl.data.arguments import DataArguments
    from qwenvl.data.dataset import make_data_module
    from qwenvl.tiny import build_tokenizer_dir

    torch.set_num_threads(1)  # one worker = one core
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        media = root / "media"
        media.mkdir()
        images = make_media(media, n_images)
        make_annotations(root / "train.jsonl", images, n_samples)
        (root / "dict.json").write_text(json.dumps({"bench": {"data_path": str(media),
                                                              "annotation_path": str(root / "train.jsonl")}}))
        tok_dir = build_tokenizer_dir(root / "tok")
        tok = AutoTokenizer.from_pretrained(tok_dir)
        args = DataArguments(dataset_use="bench", dataset_dict=str(root / "dict.json"), max_pixels=1280 * 28 * 28)
        ds = make_data_module(tok, None, args, seed=0)["train_dataset"]
        for i in range(5):  # warm-up (imports, processor construction)
            ds[i]
        lens = []
        t0 = time.perf_counter()
        for i in range(len(ds)):
            s = ds[i]
            assert "bad_sample" not in s, s
            lens.append(len(s["input_ids"]))
        dt = time.perf_counter() - t0
    return {"samples": len(ds), "seconds": dt, "samples_per_s": len(ds) / dt,
            "mean_tokens": float(np.mean(lens)), "official_samples_per_s": 2.30}


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = int(rng.lognormvariate(4.6, 0.8)) + 30
        out.append(min(text, 1200) if rng.random() < 0.1 else min(text, 600) + rng.randint(64, 1280))
    return out


def bench_padding(n: int = 4096, rows_padded: int = 8, per_step: int = 32, cap: int = 8192) -> dict:
    import torch

    from qwenvl.data.collate import DataCollator

    lens = realistic_lengths(n)
    items = []
    for m in lens:
        ids = torch.full((m,), 9707, dtype=torch.long)
        items.append({"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(m).expand(3, m).clone()})
    pad = DataCollator(pad_token_id=0, mode="padded", ensure_vision=False)
    pack = DataCollator(pad_token_id=0, mode="packing", model_max_length=cap, ensure_vision=False)
    padded_slots = sum(pad(items[i:i + rows_padded])["input_ids"].numel() for i in range(0, n, rows_padded))
    t0 = time.perf_counter()
    packed = [pack(items[i:i + per_step]) for i in range(0, n, per_step)]
    pack_s = time.perf_counter() - t0
    packed_slots = sum(b["input_ids"].numel() for b in packed)
    real = sum(lens)
    return {"samples": n, "mean_tokens": real / n, "padded_real_fraction": real / padded_slots,
            "packed_real_fraction": real / packed_slots, "padded_batch": rows_padded,
            "packing_samples_per_step": per_step, "capacity": cap,
            "mean_rows_per_step": float(np.mean([b["input_ids"].shape[0] for b in packed])),
            "packing_ms_per_step": 1e3 * pack_s / len(packed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--images", type=int, default=36)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    res = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
           "getitem": bench_getitem(a.samples, a.images), "padding": bench_padding()}
    if a.json:
        print(json.dumps(res, indent=2))
        return
    g, pd = res["getitem"], res["padding"]
    print(f"machine: {res['machine']}")
    print(f"__getitem__: {g['samples_per_s']:.1f} samples/s in one process ({g['samples']} samples, "
          f"{g['mean_tokens']:.0f} tokens mean; official 2.30)")
    print(f"real tokens: padded (batch {pd['padded_batch']}) {pd['padded_real_fraction']:.1%}, packed "
          f"({pd['packing_samples_per_step']}/step, rows <= {pd['capacity']}) {pd['packed_real_fraction']:.1%}; "
          f"{pd['mean_rows_per_step']:.2f} rows/step, {pd['packing_ms_per_step']:.1f} ms/step to pack")


if __name__ == "__main__":
    main()

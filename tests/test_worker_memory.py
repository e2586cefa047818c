"""DataLoader workers share the annotation store instead of copying it.

200,000 JSONL annotations (~40 MB, the size of the official measurement), 4 forked workers, one
full epoch through the real ``SupervisedDataset`` / ``AnnotationStore`` path (records decoded from
the shared buffer; a trivial builder instead of image decoding). The memory of the whole process
tree (summed PSS: shared pages counted once) grown since before the store was loaded must stay
within 1.5 copies of the store (plus a fixed 8 MiB of interpreter state per worker), and no
worker's private memory may exceed 0.2 copies. The official code ends the same test holding 4.19 copies of its
(6.5x larger) Python list.
"""

from __future__ import annotations

import gc
import json
import os
import time

import psutil
import pytest
import torch

from qwenvl.data.dataset import SupervisedDataset
from qwenvl.data.registry import DatasetSource, build_index

N = 200_000
WORKERS = 4


class _TrivialBuilder:
    def build(self, record: dict, data_path, fmt=None):  # SampleBuilder.build's signature
        return len(record["conversations"][1]["value"])


def _tree_pss(exclude: frozenset[int] = frozenset()) -> tuple[int, list[int]]:
    """(summed PSS of this process and its children, each child's USS = its private memory).

    ``exclude``: pids of children that existed before the test (e.g. a session-wide S3 server) - not ours.
    """
    me = psutil.Process()
    total, uss = me.memory_full_info().pss, []
    for p in me.children(recursive=True):
        if p.pid in exclude:
            continue
        try:
            info = p.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        total += info.pss
        uss.append(info.uss)
    return total, uss


def _write_annotations(path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(N):
            rec = {"id": f"sample-{i:07d}", "image": f"images/{i % 977:04d}/img_{i:07d}.jpg",
                   "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}? Describe it."},
                                     {"from": "gpt", "value": "A photo of " + "something " * (i % 7 + 3) + "."}]}
            f.write(json.dumps(rec) + "\n")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="PSS needs Linux /proc")
def test_workers_share_the_store(tmp_path):
    path = tmp_path / "big.jsonl"
    _write_annotations(path)
    gc.collect()
    others = frozenset(p.pid for p in psutil.Process().children(recursive=True))
    before, _ = _tree_pss(others)
    src = DatasetSource("big", str(tmp_path), str(path), 100.0)
    ds_ids, rec_ids, report = build_index([src], seed=0)
    assert report.total == N
    store_bytes = src.store.nbytes
    ds = SupervisedDataset([src], ds_ids, rec_ids, _TrivialBuilder())
    gc.collect()
    gc.freeze()  # keep the collector from writing to inherited objects in the workers
    try:
        loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=WORKERS, collate_fn=len,
                                             persistent_workers=True, multiprocessing_context="fork")
        t0 = time.time()
        seen = sum(loader)
        assert not any(isinstance(ds[i], dict) and "bad_sample" in ds[i] for i in (0, N - 1)), ds[0]  # real samples
        elapsed = time.time() - t0
        assert seen == N
        total, worker_uss = _tree_pss(others)
        assert len(worker_uss) >= WORKERS
    finally:
        del loader
        gc.unfreeze()
    grown = total - before
    # a forked worker's own interpreter state is a few MiB whatever the data size: allow 8 MiB each
    fixed = WORKERS * 8 * 2**20
    copies = (grown - fixed) / store_bytes
    print(f"store {store_bytes / 2**20:.1f} MiB; tree grew {grown / 2**20:.1f} MiB "
          f"({(grown - fixed) / store_bytes:.2f} copies beyond {WORKERS} x 8 MiB worker overhead); "
          f"worker private MiB {[round(u / 2**20, 1) for u in worker_uss]}; epoch {elapsed:.1f} s")
    assert copies <= 1.5, f"{copies:.2f} copies of the store across main + {WORKERS} workers"
    # no worker holds a copy of its own (the official code: +0.8 copy of its Python list per worker)
    assert max(worker_uss) <= 0.2 * store_bytes

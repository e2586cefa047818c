"""DataLoader workers share the annotation store instead of copying it.

200,000 JSONL annotations (~40 MB, the size of the official measurement), 4 forked workers, one
full epoch through the real ``SupervisedDataset`` / ``AnnotationStore`` path (records decoded from
the shared buffer; a trivial builder instead of image decoding). The memory of the whole process
tree (summed PSS: shared pages counted once) grown since before the store was loaded, less what the
same epoch over 1 % of the records grew it by (a forked worker's fixed cost), must stay within 1.5
copies of the store, and no worker's private memory may exceed the control's by 0.2 copies. The official code ends the same test holding 4.19 copies of its
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


def _write_annotations(path, n: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"id": f"sample-{i:07d}", "image": f"images/{i % 977:04d}/img_{i:07d}.jpg",
                   "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}? Describe it."},
                                     {"from": "gpt", "value": "A photo of " + "something " * (i % 7 + 3) + "."}]}
            f.write(json.dumps(rec) + "\n")


def _one_epoch(folder, n: int) -> tuple[int, int, list[int]]:
    """(store bytes, PSS the process tree grew by, each worker's private bytes) for one epoch over n records."""
    folder.mkdir()
    path = folder / "annotations.jsonl"
    _write_annotations(path, n)
    gc.collect()
    others = frozenset(p.pid for p in psutil.Process().children(recursive=True))
    before, _ = _tree_pss(others)
    src = DatasetSource("big", str(folder), str(path), 100.0)
    ds_ids, rec_ids, report = build_index([src], seed=0)
    assert report.total == n
    ds = SupervisedDataset([src], ds_ids, rec_ids, _TrivialBuilder())
    gc.collect()
    gc.freeze()  # keep the collector from writing to inherited objects in the workers
    try:
        loader = torch.utils.data.DataLoader(ds, batch_size=500, num_workers=WORKERS, collate_fn=len,
                                             persistent_workers=True, multiprocessing_context="fork")
        seen = sum(loader)
        assert not any(isinstance(ds[i], dict) and "bad_sample" in ds[i] for i in (0, n - 1)), ds[0]  # real samples
        assert seen == n
        total, worker_uss = _tree_pss(others)
        assert len(worker_uss) >= WORKERS
    finally:
        del loader
        gc.unfreeze()
    return src.store.nbytes, total - before, worker_uss


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="PSS needs Linux /proc")
def test_workers_share_the_store(tmp_path):
    # a control epoch over 1 % of the records measures what a forked worker costs whatever the data size
    # (its interpreter, the pages of the parent's heap it touches: more after a long test session) ...
    small_store, small_grown, small_uss = _one_epoch(tmp_path / "small", N // 100)
    # ... so what the full store adds on top of it is the store's own cost
    t0 = time.time()
    store_bytes, grown, worker_uss = _one_epoch(tmp_path / "big", N)
    elapsed = time.time() - t0
    copies = (grown - small_grown) / (store_bytes - small_store)
    extra = [u - min(small_uss) for u in worker_uss]
    print(f"store {store_bytes / 2**20:.1f} MiB; tree grew {grown / 2**20:.1f} MiB "
          f"(control over 1 %: {small_grown / 2**20:.1f} MiB) = {copies:.2f} copies; worker private MiB "
          f"{[round(u / 2**20, 1) for u in worker_uss]} (control {[round(u / 2**20, 1) for u in small_uss]}); "
          f"epoch {elapsed:.1f} s")
    assert copies <= 1.5, f"{copies:.2f} copies of the store across main + {WORKERS} workers"
    # no worker holds a copy of its own (the official code: +0.8 copy of its Python list per worker)
    assert max(extra) <= 0.2 * store_bytes, f"a worker holds {max(extra) / store_bytes:.2f} copies of the store"

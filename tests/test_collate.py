"""Collators: valid batches for every sample kind in every mode, packing density, bad-sample accounting."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qwenvl.data.collate import BadSampleLimitExceeded, BadSampleMonitor, DataCollator, pop_batch_stats
from qwenvl.data.sample import SampleBuilder, VisionBudget

KINDS = {"text": "txt_01", "image": "si_01", "multi_image": "mi_02", "video": "vid_01", "image_video": "q_01",
         "two_videos": "q_03"}


@pytest.fixture(scope="module")
def samples(qwen_tokenizer_dir, golden_dir) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    recs = {r["id"]: r for r in json.loads((golden_dir / "annotations/public_a.json").read_text())}
    for line in (golden_dir / "annotations/public_b.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["id"]] = r
    b = SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784))
    return {k: b.build(recs[sid], str(golden_dir / "media")) for k, sid in KINDS.items()}


def _check_valid(b: dict, mode: str) -> None:
    ids = b["input_ids"]
    for pad, pv, grid in ((151655, "pixel_values", "image_grid_thw"), (151656, "pixel_values_videos", "video_grid_thw")):
        assert pv in b and grid in b, (mode, pv)  # ensure_vision: always both
        n_feat = int(b[grid].prod(-1).sum())
        assert b[pv].shape == (n_feat, 1176)
        assert int((ids == pad).sum()) == n_feat // 4
    assert b["second_per_grid_ts"].shape[0] == b["video_grid_thw"].shape[0]
    assert b["labels"].shape == ids.shape
    if mode == "padded":
        assert b["position_ids"].shape == (3, *ids.shape) and b["attention_mask"].shape == ids.shape
    else:
        assert b["position_ids"].shape == (4, *ids.shape) and "attention_mask" not in b
        cu = b["cu_seq_lens_q"]
        assert cu.dtype == torch.int32 and int(cu[-1]) == ids.numel()
        flat0 = b["position_ids"][0].reshape(-1)
        assert (flat0[cu[:-1].long()] == 0).all()  # every segment restarts at 0
        starts = set(cu[:-1].tolist())
        assert all((flat0[i] == flat0[i - 1] + 1) for i in range(1, len(flat0)) if i not in starts)


@pytest.mark.parametrize("mode", ["padded", "flatten", "packing"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_every_mode(samples, mode, kind):
    other = samples["text"] if kind != "text" else samples["image"]
    batch = DataCollator(pad_token_id=151643, mode=mode, model_max_length=256)([samples[kind], other])
    assert pop_batch_stats(batch) == {"num_samples": 2, "num_skipped": 0}
    _check_valid(batch, mode)


def test_padded_layout(samples):
    a, b = samples["text"], samples["video"]
    batch = DataCollator(pad_token_id=151643, mode="padded", ensure_vision=False)([a, b])
    la, lb = len(a["input_ids"]), len(b["input_ids"])
    assert batch["input_ids"].shape == (2, max(la, lb))
    assert batch["input_ids"][0, la:].eq(151643).all() and batch["labels"][0, la:].eq(-100).all()
    assert batch["position_ids"][:, 0, la:].eq(1).all()  # padded with 1, as the official collator
    assert batch["attention_mask"][0].sum() == la and batch["attention_mask"][1].sum() == lb


def test_bad_samples_dropped_and_counted(samples):
    batch = DataCollator(pad_token_id=151643, mode="flatten")(
        [samples["image"], {"bad_sample": "image not found: x.jpg"}, samples["text"], None])
    assert pop_batch_stats(batch) == {"num_samples": 2, "num_skipped": 2, "skipped": [
        {"kind": "other", "reason": "image not found: x.jpg"}, {"kind": "other", "reason": "unusable sample"}]}
    assert batch["cu_seq_lens_q"].tolist()[:3] == [0, len(samples["image"]["input_ids"]),
                                                  len(samples["image"]["input_ids"]) + len(samples["text"]["input_ids"])]


def test_monitor_fails_above_ratio():
    # the rule itself (lower confidence bound) is pinned in tests/test_batch_stats.py
    m = BadSampleMonitor(max_ratio=0.05)
    m.update({"num_samples": 99, "num_skipped": 1})
    for _ in range(4):
        m.update({"num_samples": 10, "num_skipped": 0})
    with pytest.raises(BadSampleLimitExceeded, match="max_bad_sample_ratio 0.05"):
        m.update({"num_samples": 0, "num_skipped": 20})  # 21 of 160: the bound passes 5 %
    m2 = BadSampleMonitor(max_ratio=0.5)
    with pytest.raises(BadSampleLimitExceeded):
        m2.update({"num_samples": 0, "num_skipped": 8})  # everything bad: fail early


def _fake(n: int, image: bool) -> dict:
    ids = torch.full((n,), 9707, dtype=torch.long)
    s = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(n).expand(3, n).clone()}
    if image:  # a 2x2-token image inside
        ids[5:9] = 151655
        s["pixel_values"] = torch.zeros(16, 1176)
        s["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    return s


def realistic_lengths(n: int, seed: int = 0) -> list[int]:
    """Image SFT at max_pixels 1280*28*28: 64..1280 image tokens + 30..600 text tokens; 10 % text only."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        text = int(rng.lognormvariate(4.6, 0.8)) + 30
        out.append(min(text, 1200) if rng.random() < 0.1 else min(text, 600) + rng.randint(64, 1280))
    return out


def test_packing_density_beats_padding():
    lens = realistic_lengths(512)
    items = [_fake(n, image=True) for n in lens]
    cap, per_step = 8192, 32
    real = sum(lens)
    padded_slots = packed_slots = 0
    pad = DataCollator(pad_token_id=0, mode="padded", ensure_vision=False)
    pack = DataCollator(pad_token_id=0, mode="packing", model_max_length=cap, ensure_vision=False)
    for i in range(0, len(items), per_step):
        chunk = items[i:i + per_step]
        padded_slots += pad(chunk[:8])["input_ids"].numel() + sum(
            pad(chunk[j:j + 8])["input_ids"].numel() for j in range(8, per_step, 8))
        b = pack(chunk)
        assert b["input_ids"].shape[1] <= cap
        packed_slots += b["input_ids"].numel()
    padded_real, packed_real = real / padded_slots, real / packed_slots
    assert packed_real >= 0.97, packed_real
    assert padded_real < 0.85 < packed_real

"""Our samples vs. the official Qwen2.5-era pipeline's outputs (tests/golden/official-qwen25).

Every processable sample must match under all four settings: input_ids, labels, position_ids,
grids and frame indices exactly; pixel statistics within the golden README's tolerances.

Deliberate differences, tested below:
* text-only (txt_01, txt_03): match the official record *with the #1337 fix* (unpatched crashes);
* q_01 / q_09 (image + video): tokens/positions/images match the official record, and the video
  features are attached too (the official code drops them: forward would fail);
* q_03 (two videos): works (the official code raises): each video as when processed alone;
* q_05 (key ``images``): a bad sample with a reason naming the key (the official swaps it for its neighbour);
* q_07 (two images, one tag): a bad sample (the official processes an image nobody sees).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qwenvl.data.collate import DataCollator
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget

SETTINGS = ["script", "defaults", "readme_video", "dense_video"]
DELIBERATE = {"q_01", "q_09", "q_03", "q_05", "q_07"}


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def records(golden_dir) -> dict:
    recs = {r["id"]: r for r in json.loads((golden_dir / "annotations/public_a.json").read_text())}
    for line in (golden_dir / "annotations/public_b.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["id"]] = r
    return recs


@pytest.fixture(scope="module")
def built(golden_dir, tokenizer, records) -> dict:
    """{setting: (expected json, {id: sample or BadSample})} - built once for the module."""
    out = {}
    for setting in SETTINGS:
        exp = json.loads((golden_dir / f"expected/{setting}.json").read_text())
        b = SampleBuilder(tokenizer, VisionBudget(**exp["data_arguments"]))
        got = {}
        for sid in exp["samples"]:
            try:
                got[sid] = b.build(records[sid], str(golden_dir / "media"))
            except BadSample as e:
                got[sid] = e
        out[setting] = (exp, got)
    return out


def _stats(t: torch.Tensor) -> dict:
    a = t.numpy().astype(np.float64)
    return {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "sum": a.sum(),
            "sum_sq": (a * a).sum(), "abs_sum": np.abs(a).sum(), "first8": a.reshape(-1)[:8].tolist()}


def _check_stats(got: torch.Tensor, exp: dict, what: str) -> None:
    s = _stats(got)
    assert s["shape"] == exp["shape"] and s["dtype"] == exp["dtype"], what
    assert abs(s["sum_sq"] - exp["sum_sq"]) <= 1e-4 * abs(exp["sum_sq"]), what
    assert abs(s["abs_sum"] - exp["abs_sum"]) <= 1e-4 * abs(exp["abs_sum"]), what
    assert abs(s["sum"] - exp["sum"]) <= 1e-4 * exp["abs_sum"], what
    assert np.allclose(s["first8"], exp["first8"], atol=1e-4, rtol=0), what
    rows = 0
    for k, item in enumerate(exp.get("per_item") or []):
        n = item["shape"][0]
        _check_stats(got[rows:rows + n], {**item, "per_item": None}, f"{what} item {k}")
        rows += n


def _grid(t) -> list | None:
    return None if t is None else t.tolist()


@pytest.mark.parametrize("setting", SETTINGS)
def test_every_processable_sample_matches(built, setting):
    exp, got = built[setting]
    checked = 0
    for sid, e in exp["samples"].items():
        if "error" in e or sid in DELIBERATE:
            continue
        g = got[sid]
        assert not isinstance(g, Exception), f"{sid}: {g}"
        assert g["input_ids"].tolist() == e["input_ids"], sid
        assert g["labels"].tolist() == e["labels"], sid
        assert g["position_ids"].tolist() == e["position_ids"], sid
        assert [len(e["input_ids"])] == e["attention_mask"]
        assert _grid(g.get("image_grid_thw")) == e["image_grid_thw"], sid
        assert _grid(g.get("video_grid_thw")) == e["video_grid_thw"], sid
        for key in ("pixel_values", "pixel_values_videos"):
            assert (key in g) == (e[key] is not None), (sid, key)
            if e[key] is not None:
                _check_stats(g[key], e[key], f"{setting}/{sid}/{key}")
        for k, vp in enumerate(e["videos_processed"]):
            assert g["frame_idx"][k] == vp["frame_idx"], sid
            assert g["second_per_grid_ts"][k].item() == pytest.approx(vp["second_per_grid_ts"][0], rel=1e-9)
        checked += 1
    assert checked >= (22 if setting in ("script", "defaults") else 6)


def test_text_only_matches_patched_official(built):
    exp, got = built["script"]
    for sid in ("txt_01", "txt_03"):
        g = got[sid]
        assert g["input_ids"].tolist() == exp["samples"][sid]["input_ids"]
        assert g["position_ids"].tolist() == [list(range(len(g["input_ids"])))] * 3
        assert "pixel_values" not in g and "pixel_values_videos" not in g


@pytest.mark.parametrize("setting", SETTINGS)
def test_image_plus_video_attaches_both(built, setting):
    exp, got = built[setting]
    for sid in ("q_01", "q_09"):
        if sid not in exp["samples"]:
            continue
        e, g = exp["samples"][sid], got[sid]
        assert g["input_ids"].tolist() == e["input_ids"]
        assert g["labels"].tolist() == e["labels"]
        assert g["position_ids"].tolist() == e["position_ids"]
        assert e["pixel_values_videos"] is None  # the official bug we fix
        n_vid_tok = int((g["input_ids"] == 151656).sum())
        assert n_vid_tok > 0 and g["video_grid_thw"].prod(-1).sum() // 4 == n_vid_tok
        assert g["pixel_values_videos"].shape[0] == g["video_grid_thw"].prod(-1).sum()
        assert [v["grid_thw"] for v in e["videos_processed"]] == g["video_grid_thw"].tolist()
        if e["pixel_values"] is not None:
            _check_stats(g["pixel_values"], e["pixel_values"], f"{sid} images")


def test_two_videos_work(built):
    exp, got = built["script"]
    g = got["q_03"]
    assert "error" in exp["samples"]["q_03"]  # the official code cannot
    # each video is processed as when it is alone: clip_2s (vid_01) and clip_10s (vid_04)
    one, two = got["vid_01"], got["vid_04"]
    assert g["video_grid_thw"].tolist() == one["video_grid_thw"].tolist() + two["video_grid_thw"].tolist()
    assert torch.equal(g["pixel_values_videos"], torch.cat([one["pixel_values_videos"], two["pixel_values_videos"]]))
    assert g["second_per_grid_ts"].tolist() == one["second_per_grid_ts"].tolist() + two["second_per_grid_ts"].tolist()
    assert int((g["input_ids"] == 151656).sum()) == int(g["video_grid_thw"].prod(-1).sum()) // 4
    assert g["position_ids"].shape == (3, len(g["input_ids"]))


def test_images_key_and_tag_mismatch_are_bad_samples(built):
    for setting in ("script", "defaults"):
        _, got = built[setting]
        assert isinstance(got["q_05"], BadSample) and "'images'" in str(got["q_05"])
        assert isinstance(got["q_07"], BadSample) and "tag" in str(got["q_07"])


# ------------------------------------------------------------------ batches.json
@pytest.fixture(scope="module")
def golden_batches(golden_dir) -> dict:
    return json.loads((golden_dir / "expected/batches.json").read_text())


def _batch_samples(built, golden_batches):
    _, got = built[golden_batches["setting"]]
    return [got[s] for s in golden_batches["sample_ids"]]


def test_flattened_batch_matches(built, golden_batches):
    e = golden_batches["flattened"]
    coll = DataCollator(pad_token_id=151643, mode="flatten", model_max_length=8192)
    b = coll(_batch_samples(built, golden_batches))
    assert b["input_ids"].tolist() == [e["input_ids"]]
    assert b["labels"].tolist() == [e["labels"]]
    assert b["position_ids"].shape[0] == 4
    assert b["position_ids"][1:, 0].tolist() == e["position_ids"]
    assert b["cu_seq_lens_q"].dtype == torch.int32
    assert b["cu_seq_lens_q"].tolist() == e["attention_mask_cu_seqlens"]
    # row 0: plain per-sample positions (what transformers needs for the block-diagonal mask)
    cu = e["attention_mask_cu_seqlens"]
    assert b["position_ids"][0, 0].tolist() == [i for s, t in zip(cu[:-1], cu[1:], strict=True) for i in range(t - s)]
    assert "attention_mask" not in b and b["use_cache"] is False
    assert b["image_grid_thw"].tolist() == e["image_grid_thw"]
    assert b["video_grid_thw"].tolist() == e["video_grid_thw"]
    _check_stats(b["pixel_values"], e["pixel_values"], "flattened pixel_values")
    _check_stats(b["pixel_values_videos"], e["pixel_values_videos"], "flattened pixel_values_videos")
    assert b["num_samples"] == 3 and b["num_skipped"] == 0


def test_padded_batch_matches(built, golden_batches):
    e = golden_batches["padded"]
    coll = DataCollator(pad_token_id=151643, mode="padded", model_max_length=8192)
    b = coll(_batch_samples(built, golden_batches))
    assert b["input_ids"].tolist() == e["input_ids"]
    assert b["labels"].tolist() == e["labels"]
    assert b["attention_mask"].tolist() == e["attention_mask"]
    assert b["position_ids"].tolist() == e["position_ids"]
    assert b["image_grid_thw"].tolist() == e["image_grid_thw"]
    assert b["video_grid_thw"].tolist() == e["video_grid_thw"]
    _check_stats(b["pixel_values"], e["pixel_values"], "padded pixel_values")


def test_no_truncation_through_vision_tokens(built, golden_batches):
    """The official model_max_length=64 batch holds fewer image tokens than features; ours never does."""
    e = golden_batches["padded_truncated_64"]
    n_tok = sum(row.count(151655) for row in e["input_ids"])
    assert n_tok < np.prod(e["image_grid_thw"], axis=1).sum() // 4  # the official bug, as recorded
    samples = _batch_samples(built, golden_batches)
    for mode in ("padded", "flatten", "packing"):
        coll = DataCollator(pad_token_id=151643, mode=mode, model_max_length=64)
        b = coll(samples)
        assert b["num_skipped"] == 1 and b["num_samples"] == 2  # si_01 (104 tokens) skipped whole
        if mode == "packing":  # rows bounded by model_max_length; flatten bounds each sample only
            assert b["input_ids"].shape[-1] <= 64
        for pad, grid in ((151655, "image_grid_thw"), (151656, "video_grid_thw")):
            assert int((b["input_ids"] == pad).sum()) == int(b[grid].prod(-1).sum()) // 4, (mode, grid)
            assert b["pixel_values" if pad == 151655 else "pixel_values_videos"].shape[0] == int(b[grid].prod(-1).sum())


def test_sample_lengths_and_golden_table(built):
    exp, got = built["script"]
    lens = {sid: len(g["input_ids"]) for sid, g in got.items() if not isinstance(g, Exception)}
    assert lens["si_01"] == 104 and lens["vid_01"] == 47 and lens["txt_01"] == 30 and lens["uni_03"] == 396


def test_golden_dir_layout(golden_dir):
    assert Path(golden_dir, "expected", "index.json").exists()

"""Our Qwen3-VL samples vs. the official trainer's HEAD outputs (tests/golden/official-qwen3vl-head).

Every sample HEAD processes must match under all four settings (defaults, script, dense_video, small_pixels):
input_ids, labels, position_ids, grids, frame indices and the timestamps in the text exactly; pixel statistics
within the golden README's tolerances. The tokenizer and processor files come from ``qwenvl.tiny`` (the recipe of
the golden README); the data arguments of each setting are passed by their official names.

Deliberate differences (qwenvl/data/chat_head.py), tested below: gf_01/gf_03 (the opening gpt turn is dropped:
our tokens = HEAD's minus that turn), q_01 (a system turn stays masked), q_08 (user text holding the
``assistant`` token is not trained), q_02 (role/content turns are read), q_16 (no answer: a bad sample).
Samples HEAD rejects are rejected with a reason (q_03 q_04 q_10 q_12 q_13 q_14).
For Qwen2.5-VL the Qwen2.5-era behaviour stays (tests/test_golden.py); where HEAD differs is pinned at the end.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from qwenvl.arguments import budget_fields
from qwenvl.data.collate import DataCollator
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.vision import VisionSpec

SETTINGS = ["script", "defaults", "dense_video", "small_pixels"]
DELIBERATE = {"gf_01", "gf_03", "q_01", "q_08", "q_02", "q_16"}
REJECTED = {"q_03": "bad_media_field", "q_04": "tags_media_mismatch", "q_10": "missing_media",
            "q_12": "media_unreadable", "q_13": "media_unreadable", "q_14": "media_unreadable"}
QWEN3_SPEC = VisionSpec(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)


@pytest.fixture(scope="module")
def head_dir(repo_root):
    return repo_root / "tests" / "golden" / "official-qwen3vl-head"


@pytest.fixture(scope="module")
def tok3(tmp_path_factory):
    from transformers import AutoTokenizer

    from qwenvl.tiny import build_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(build_tokenizer_dir(tmp_path_factory.mktemp("qwen3vl"), family="qwen3_vl"))
    assert len(tok) == 151669 and tok.convert_tokens_to_ids("<think>") == 151667  # the README's checks
    return tok


@pytest.fixture(scope="module")
def records(head_dir) -> dict:
    recs = {r["id"]: r for r in json.loads((head_dir / "annotations/public_a.json").read_text())}
    for line in (head_dir / "annotations/public_b.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["id"]] = r
    return recs


def _budget(exp: dict) -> VisionBudget:
    return VisionBudget(**{k: v for k, v in exp["data_arguments"].items() if k in budget_fields()})


@pytest.fixture(scope="module")
def built(head_dir, tok3, records) -> dict:
    """{setting: (expected, {id: sample or BadSample})}, Qwen3-VL, built once."""
    out = {}
    for setting in SETTINGS:
        exp = json.loads((head_dir / f"expected/qwen3vl/{setting}.json").read_text())
        b = SampleBuilder(tok3, _budget(exp), spec=QWEN3_SPEC, model_type="qwen3_vl")
        got = {}
        for sid in exp["samples"]:
            try:
                got[sid] = b.build(records[sid], str(head_dir / "media"))
            except BadSample as e:
                got[sid] = e
        out[setting] = (exp, got)
    return out


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


def _same_list(got: torch.Tensor, e: dict, name: str) -> bool:
    value = got.tolist()
    if e.get("stored") == "digest":
        return _digest(value) == e[f"{name}_sha256"]
    return value == e[name]


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
    checked = videos = 0
    for sid, e in exp["samples"].items():
        if "error" in e or sid in DELIBERATE:
            continue
        g = got[sid]
        assert not isinstance(g, Exception), f"{setting}/{sid}: {g}"
        for name in ("input_ids", "labels", "position_ids"):
            assert _same_list(g[name], e, name), (setting, sid, name)
        assert [len(g["input_ids"])] == e["attention_mask"] and len(g["input_ids"]) == e["length"]
        assert _grid(g.get("image_grid_thw")) == e["image_grid_thw"], sid
        assert _grid(g.get("video_grid_thw")) == e["video_grid_thw"], sid
        assert "second_per_grid_ts" not in g  # HEAD's get_rope_index_3 ignores it; the model takes none
        for key in ("pixel_values", "pixel_values_videos"):
            assert (key in g) == (e[key] is not None), (sid, key)
            if e[key] is not None:
                _check_stats(g[key], e[key], f"{setting}/{sid}/{key}")
        assert g.get("frame_idx", []) == [v["frame_idx"] for v in e["videos_processed"]], sid
        stamps = [float(f"{t:.1f}") for v in g.get("video_timestamps", []) for t in v]
        assert stamps == e["video_timestamps_in_text"], sid
        checked += 1
        videos += bool(e["videos_processed"])
    assert checked >= (10 if setting == "dense_video" else 34) and videos >= 10, (checked, videos)


def test_video_prompt_carries_timestamps(built, tok3):
    _, got = built["script"]
    text = tok3.decode(got["vid_01"]["input_ids"])
    assert text.startswith("<|im_start|>user\n<0.3 seconds><|vision_start|><|video_pad|>")
    assert "<|vision_end|><1.6 seconds><|vision_start|>" in text and "system" not in text


def test_rejected_samples_have_a_reason(built):
    for setting in SETTINGS:
        exp, got = built[setting]
        for sid, kind in REJECTED.items():
            if sid not in exp["samples"]:
                continue
            assert "error" in exp["samples"][sid]  # HEAD rejects it too
            assert isinstance(got[sid], BadSample) and got[sid].kind == kind, (setting, sid, got[sid])
        assert "32 pixels" in str(got["q_14"]) if "q_14" in got else True
        if "q_13" in got:
            assert "1 frame" in str(got["q_13"])


def test_deliberate_differences(built):
    exp, got = built["script"]
    s = exp["samples"]
    for sid in ("gf_01", "gf_03"):  # HEAD keeps and trains the opening gpt turn; we drop it
        e, g = s[sid], got[sid]
        cut = e["input_ids"].index(151644, 1)  # the second <|im_start|>
        assert g["input_ids"].tolist() == e["input_ids"][cut:]
        assert g["labels"].tolist() == e["labels"][cut:]
    g, e = got["q_01"], s["q_01"]  # system turn: masked, not an assistant turn
    assert g["input_ids"].tolist()[:3] == [151644, 8948, 198] and e["input_ids"][1] == 77091
    assert all(x == -100 for x in g["labels"].tolist()[:10])
    g, e = got["q_08"], s["q_08"]  # 'assistant' in user text: HEAD trains the rest of the user turn
    assert g["input_ids"].tolist() == e["input_ids"]
    assert len(e["label_spans"]) == 2 and (g["labels"] != -100).sum() == e["label_spans"][1][1] - e["label_spans"][1][0]
    assert "error" in s["q_02"] and not isinstance(got["q_02"], Exception)  # role/content turns are read
    assert isinstance(got["q_16"], BadSample) and got["q_16"].kind == "no_answer"


# ------------------------------------------------------------------ batches.json (setting script)
@pytest.fixture(scope="module")
def golden_batches(head_dir) -> dict:
    return json.loads((head_dir / "expected/qwen3vl/batches.json").read_text())


def _list_or_digest(value, e: dict, name: str) -> bool:
    return value == e[name] if name in e else _digest(value) == e[f"{name}_sha256"]


def test_batches_match(built, golden_batches):
    _, got = built["script"]
    for batch in golden_batches["batches"]:
        samples = [got[s] for s in batch["sample_ids"]]
        e = batch["flattened"]
        b = DataCollator(pad_token_id=151643, mode="flatten", model_max_length=8192)(samples)
        assert _list_or_digest(b["input_ids"][0].tolist(), e, "input_ids")
        assert _list_or_digest(b["labels"][0].tolist(), e, "labels")
        assert _list_or_digest(b["position_ids"][1:, 0].tolist(), e, "position_ids")
        assert b["cu_seq_lens_q"].tolist() == e["attention_mask_cu_seqlens"]
        assert _grid(b.get("image_grid_thw")) == e["image_grid_thw"]
        assert _grid(b.get("video_grid_thw")) == e["video_grid_thw"]
        for key in ("pixel_values", "pixel_values_videos"):
            if e.get(key) is not None:
                _check_stats(b[key], e[key], f"flattened {key}")
        p = batch["padded"]
        b = DataCollator(pad_token_id=151643, mode="padded", model_max_length=8192)(samples)
        assert _list_or_digest(b["input_ids"].tolist(), p, "input_ids")
        assert _list_or_digest(b["labels"].tolist(), p, "labels")
        assert _list_or_digest(b["position_ids"].tolist(), p, "position_ids")


# ------------------------------------------------------------------ Qwen2.5-VL: where HEAD differs
def test_qwen25_keeps_the_qwen25_era_video_sampling(head_dir, qwen_tokenizer_dir, records):
    """HEAD's Qwen2.5-VL processor uses every frame (do_sample_frames False) and ``2 / video_fps`` as the patch
    interval; we keep the Qwen2.5-era sampling (at most video_max_frames, interval from the sampled rate)."""
    from transformers import AutoTokenizer

    exp = json.loads((head_dir / "expected/qwen2.5vl/script.json").read_text())
    b = SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), _budget(exp), model_type="qwen2_5_vl")
    g = b.build(records["vid_02"], str(head_dir / "media"))  # 4 s at 24 fps: 96 frames
    e = exp["samples"]["vid_02"]
    assert len(e["videos_processed"][0]["frame_idx"]) == 96 and e["second_per_grid_ts"] == [1.0]
    assert len(g["frame_idx"][0]) <= exp["data_arguments"]["video_max_frames"]
    assert g["input_ids"][:5].tolist() == [151644, 8948, 198, 2610, 525]  # the Qwen2.5 system prompt
    img = b.build(records["si_01"], str(head_dir / "media"))
    assert img["image_grid_thw"].tolist() == exp["samples"]["si_01"]["image_grid_thw"]  # same resize rule

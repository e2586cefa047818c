"""Training/inference parity (issue 11, item 5): for every golden sample with images (tests/golden/official-qwen25),
the prompt that ``vlsft chat`` / ``predict`` build through ``qwen_vl_utils.process_vision_info`` and the saved
processor (:class:`qwenvl.infer.Inference`) equals the training pipeline's tokens up to the assistant turn, and
its pixels equal the training sample's. A wrong pixel budget makes the comparison fail (negative control).

Videos are not compared here: qwen-vl-utils samples frames by fps (``FPS`` / ``nframes``), the Qwen2.5-era
training pipeline by ``base_interval`` / ``video_*_frames``, so the frame sets differ by design (left open).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from qwenvl.data.sample import SampleBuilder, VisionBudget

SETTING = "script"  # the official sft.sh pixel budget (max_pixels 50176, min_pixels 784)
SKIP = {"q_05", "q_07"}  # deliberate bad samples (test_golden.py)


@pytest.fixture(scope="module")
def golden(golden_dir, qwen_tokenizer_dir):
    from transformers import AutoProcessor, AutoTokenizer

    exp = json.loads((golden_dir / f"expected/{SETTING}.json").read_text())
    records = {r["id"]: r for r in json.loads((golden_dir / "annotations/public_a.json").read_text())}
    for line in (golden_dir / "annotations/public_b.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["id"]] = r
    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    proc = AutoProcessor.from_pretrained(qwen_tokenizer_dir)
    builder = SampleBuilder(tok, VisionBudget(**exp["data_arguments"]))
    ids = [s for s in exp["samples"] if s in records and s not in SKIP and records[s].get("image")
           and not records[s].get("video")]
    return {"records": records, "ids": ids, "builder": builder, "proc": proc, "media": golden_dir / "media",
            "limits": {k: exp["data_arguments"][k] for k in ("min_pixels", "max_pixels")}}


def _engine(proc, min_pixels: int, max_pixels: int):
    from qwenvl.infer import Inference

    proc.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}  # as qwenvl.infer.load
    return Inference(model=None, processor=proc, folder=None, min_pixels=min_pixels, max_pixels=max_pixels)


def _messages(record: dict, media_dir, engine) -> list[dict]:
    """The record's first user turn as chat content parts, media where its <image> tags stand."""
    images = record["image"] if isinstance(record["image"], list) else [record["image"]]
    user = next(t for t in record["conversations"] if t["from"] == "human")
    parts, k = [], 0
    for piece in re.split(r"(<image>)", user["value"]):
        if piece == "<image>":
            parts.append(engine.image_part(str(media_dir / images[k])))  # what chat / predict send
            k += 1
        elif piece:
            parts.append({"type": "text", "text": piece})
    return [{"role": "user", "content": parts}]


def _training_prefix(builder, record: dict, media_dir) -> tuple[list[int], torch.Tensor]:
    sample = builder.build(record, str(media_dir))
    labels = sample["labels"].tolist()
    first = next(i for i, x in enumerate(labels) if x != -100)  # the first trained token: the assistant's answer
    return sample["input_ids"][:first].tolist(), sample["pixel_values"]


def _compare(golden, engine) -> list[str]:
    """Mismatches between inference prompts and training prefixes (empty: parity)."""
    bad = []
    for sid in golden["ids"]:
        rec = golden["records"][sid]
        ids, pixels = _training_prefix(golden["builder"], rec, golden["media"])
        n_images = len(rec["image"]) if isinstance(rec["image"], list) else 1
        first_user_images = _messages(rec, golden["media"], engine)[0]["content"]
        if sum(p["type"] == "image" for p in first_user_images) != n_images:
            continue  # images in later turns: their pixels are not part of the first prompt
        inputs = engine.prompt_inputs(_messages(rec, golden["media"], engine))
        got = inputs["input_ids"][0].tolist()
        if got != ids:
            bad.append(f"{sid}: tokens differ ({len(got)} vs {len(ids)})")
            continue
        pv = inputs["pixel_values"]
        if pv.shape != pixels.shape or not torch.allclose(pv.float(), pixels.float(), atol=0.05):
            diff = (pv.float() - pixels.float()).abs().max().item() if pv.shape == pixels.shape else "shape"
            bad.append(f"{sid}: pixels differ ({diff})")
    return bad


def test_inference_prompt_equals_training_tokens_and_pixels(golden):
    assert len(golden["ids"]) >= 8
    engine = _engine(golden["proc"], **golden["limits"])
    assert _compare(golden, engine) == []


def test_wrong_pixel_budget_breaks_parity(golden):
    lim = golden["limits"]
    engine = _engine(golden["proc"], lim["min_pixels"], lim["max_pixels"] // 4)
    bad = _compare(golden, engine)
    assert bad and any("tokens differ" in b for b in bad), bad


def test_chat_messages_put_the_newline_after_the_media(golden):
    """Issue 19 item 10: `vlsft chat --image X "Question"` builds what training saw for "<image>\\nQuestion" - the
    newline after the media included - for every golden sample whose first user turn is one leading image tag."""
    engine = _engine(golden["proc"], **golden["limits"])
    n = 0
    for sid in golden["ids"]:
        rec = golden["records"][sid]
        user = next(t for t in rec["conversations"] if t["from"] == "human")["value"]
        if not user.startswith("<image>\n") or user.count("<image>") != 1 or isinstance(rec["image"], list):
            continue
        ids, _ = _training_prefix(golden["builder"], rec, golden["media"])
        msgs = engine.messages(user[len("<image>\n"):], images=[str(golden["media"] / rec["image"])])
        assert engine.prompt_inputs(msgs)["input_ids"][0].tolist() == ids, sid
        n += 1
    assert n >= 3

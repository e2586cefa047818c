"""vlsft's Qwen3.5 / Qwen3.6 / Qwen3.8 samples vs. the published chat templates (qwenvl/chat_templates).

For every conversation below and every template, the sample the trainer builds (a messages or sharegpt record through
qwenvl.data.formats and SampleBuilder, real images and videos) has exactly the tokens of transformers'
``apply_chat_template`` with that template (the vision placeholders expanded with the sample's own grids and
timestamps, as the processor does), and its labels are exactly the assistant answers (through ``<|im_end|>\\n``)
plus, with ``thinking_loss: train``, their non-empty think blocks. The one deliberate difference: Qwen3.8's template
reads reasoning only from the ``reasoning_content`` field; vlsft moves an inline ``<think>`` block there, so the
reference for an inline block is the field (issue 22 item 2).
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from qwenvl.data import formats
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.vision import VisionSpec
from qwenvl.templates import CHAT_TEMPLATES

RENDERINGS = ("qwen3.5", "qwen3.6", "qwen3.8")
QWEN3_SPEC = VisionSpec(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
BUDGET = VisionBudget(max_pixels=64 * 32 * 32, min_pixels=4 * 32 * 32, video_max_frames=4, video_min_frames=2)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}},
         {"type": "function", "function": {"name": "zoom", "parameters": {"type": "object", "properties": {}}}}]


def _u(*parts):
    return {"role": "user", "content": list(parts) if len(parts) > 1 or not isinstance(parts[0], str) else parts[0]}


def _a(content, **kw):
    return {"role": "assistant", "content": content, **kw}


IMG = {"type": "image", "image": "images/photo_640x480.jpg"}
IMG2 = {"type": "image_url", "image_url": {"url": "images/square_512x512.jpg"}}
VID = {"type": "video", "video": "videos/clip_4s_24fps_160x120.mp4"}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}
CALL2 = {"type": "function", "function": {"name": "zoom", "arguments": {"box": [1, 2, 3, 4], "deep": True,
                                                                          "note": None, "scale": 1.5, "tag": "a b"}}}

#: name -> (messages record, dictionary keys of its dataset)
CASES = {
    "single": ({"messages": [_u("Hi there"), _a("Hello!")]}, {}),
    "system_image_inline_think": ({"messages": [
        {"role": "system", "content": "  You are terse. "}, _u(IMG, {"type": "text", "text": "\nWhat is it?  "}),
        _a("<think>\nA photo of\nsomething.\n</think>\n\nA photo.")]}, {}),
    "multi_turn_inline": ({"messages": [
        _u(IMG, {"type": "text", "text": "Describe."}), _a("<think>first thought</think>\n\nA scene."),
        _u("And the colours?"), _a("<think>\nsecond thought\n</think>\n\nMostly grey.")]}, {}),
    "reasoning_field": ({"messages": [
        _u("2+2?"), _a("4", reasoning_content="  Add them. "), _u("3+3?"), _a("6", reasoning_content="Again.")]}, {}),
    "thinking_key_and_plain": ({"messages": [
        _u("Q1"), _a("A1", thinking="T1"), _u("Q2"), _a("A2 without reasoning")]}, {}),
    "no_reasoning_anywhere": ({"messages": [_u("one"), _a("1"), _u("two"), _a("2")]}, {}),
    "two_images_whitespace": ({"messages": [
        _u({"type": "text", "text": "  Compare "}, IMG, {"type": "text", "text": " with "}, IMG2,
           {"type": "text", "text": " \n"}), _a("  The first is larger.  ")]}, {}),
    "tags_in_text": ({"messages": [_u("<image>\nWhat is here?"), _a("<think>look</think>A square.")],
                      "images": ["images/square_512x512.jpg"]}, {}),
    "video": ({"messages": [_u(VID, {"type": "text", "text": "What happens?"}),
                            _a("<think>\nframes\n</think>\n\nA clip.")]}, {}),
    "tools": ({"tools": TOOLS, "messages": [
        {"role": "system", "content": "Use tools."}, _u("Weather in Paris?"),
        _a("", tool_calls=[CALL], reasoning_content="Need the weather."),
        {"role": "tool", "content": '{"temp": 21}'}, _a("Sunny, 21 degrees.", reasoning_content="Got it.")]}, {}),
    "tools_parallel_results": ({"tools": TOOLS, "messages": [
        _u(IMG, {"type": "text", "text": "Zoom and weather"}), _a("Calling both.", tool_calls=[CALL2, CALL]),
        {"role": "tool", "content": "zoomed"}, {"role": "tool", "content": "  rainy "}, _a("Done: rainy.")]}, {}),
    "tools_no_system": ({"tools": TOOLS[:1], "messages": [_u("hi"), _a("hello")]}, {}),
    "mask_thinking": ({"messages": [_u("Q"), _a("<think>\nsecret\n</think>\n\nA")]}, {"thinking_loss": "mask"}),
    "loss_false_and_last": ({"messages": [
        _u("Q1"), _a("A1", reasoning_content="R1", loss=False), _u("Q2"), _a("A2", reasoning_content="R2")]}, {}),
    "train_on_last": ({"messages": [_u("Q1"), _a("A1", reasoning_content="R1"), _u("Q2"), _a("A2")]},
                      {"train_on": "last"}),
    "empty_system": ({"messages": [{"role": "system", "content": ""}, _u("Q"), _a("A")]}, {}),
    "effort_low_dataset": ({"messages": [{"role": "system", "content": "S"}, _u("Q"), _a("A")]},
                           {"reasoning_effort": "low"}),
    "effort_medium_sample": ({"messages": [_u("Q"), _a("A", reasoning_content="R")],
                              "chat_template_kwargs": {"reasoning_effort": "medium"}}, {"reasoning_effort": "low"}),
    "effort_none": ({"messages": [{"role": "system", "content": "S"}, _u("Q"), _a("A")]}, {"reasoning_effort": "none"}),
    "effort_top_level_with_tools": ({"tools": TOOLS, "reasoning_effort": "low", "messages": [_u("Q"), _a("A")]}, {}),
    "preserve_true": ({"messages": [_u("Q1"), _a("A1", reasoning_content="R1"), _u("Q2"), _a("A2")],
                       "chat_template_kwargs": {"preserve_thinking": True}}, {}),
    "preserve_false": ({"messages": [_u("Q1"), _a("A1", reasoning_content="R1"), _u("Q2"), _a("A2")],
                        "chat_template_kwargs": {"preserve_thinking": False}}, {}),
    "enable_thinking_false": ({"messages": [_u("Q"), _a("A")], "chat_template_kwargs": {"enable_thinking": False}},
                              {}),
}


def _reference_messages(rec: dict, rendering: str) -> list[dict]:
    """The record as apply_chat_template's messages: parts with media as bare parts, JSON-string arguments parsed,
    (Qwen3.8) an inline ``<think>`` block moved into ``reasoning_content``, vlsft-only keys dropped."""
    out = []
    for m in copy.deepcopy(rec["messages"]):
        m.pop("loss", None)
        if "thinking" in m:
            m["reasoning_content"] = m.pop("thinking")
        if isinstance(m["content"], str) and ("<image>" in m["content"] or "<video>" in m["content"]):
            pieces = re.split(r"(<image>|<video>)", m["content"])
            m["content"] = [{"type": p[1:-1]} if p in ("<image>", "<video>") else {"type": "text", "text": p}
                            for p in pieces if p]
        for call in m.get("tool_calls", []):
            f = call["function"]
            if isinstance(f["arguments"], str):
                f["arguments"] = json.loads(f["arguments"])
        if rendering == "qwen3.8" and m["role"] == "assistant" and "reasoning_content" not in m \
                and "</think>" in m["content"]:
            head, answer = m["content"].split("</think>")
            m["reasoning_content"], m["content"] = head.replace("<think>", "").strip(), answer.lstrip("\n")
        out.append(m)
    return out


def _reference_kwargs(rec: dict, keys: dict) -> dict:
    kw = {}
    effort = rec.get("chat_template_kwargs", {}).get("reasoning_effort",
                                                    rec.get("reasoning_effort", keys.get("reasoning_effort")))
    if effort == "none":
        kw["enable_thinking"] = False
    elif effort is not None:
        kw["reasoning_effort"] = effort
    for k in ("enable_thinking", "preserve_thinking"):
        if k in rec.get("chat_template_kwargs", {}):
            kw[k] = rec["chat_template_kwargs"][k]
    return kw


def _expand(text: str, sample: dict) -> str:
    """The processor's expansion of the placeholders: pads per image, per video a block per temporal patch."""
    for g in sample.get("image_grid_thw", []).tolist() if "image_grid_thw" in sample else []:
        text = text.replace("<|image_pad|>", "<|IMG|>" * (g[0] * g[1] * g[2] // 4), 1)
    if "video_grid_thw" in sample:
        for g, stamps in zip(sample["video_grid_thw"].tolist(), sample["video_timestamps"], strict=True):
            frames = "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|VID|>" * (g[1] * g[2] // 4) + "<|vision_end|>"
                             for t in stamps)
            text = text.replace("<|vision_start|><|video_pad|><|vision_end|>", frames, 1)
    return text.replace("<|IMG|>", "<|image_pad|>").replace("<|VID|>", "<|video_pad|>")


def _trained_spans(text: str, rec: dict, keys: dict) -> list[str]:
    """The expected trained text: per trained assistant turn, its think block (non-empty, thinking_loss train)
    and its answer through <|im_end|>\\n, as contiguous spans."""
    turns = [m for m in rec["messages"] if m["role"] == "assistant"]
    trained = [m.get("loss") is not False for m in turns]
    if keys.get("train_on") == "last":
        trained = [i == len(turns) - 1 for i in range(len(turns))]
    spans = []
    for keep, seg in zip(trained, re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>\n)", text, re.S), strict=True):
        if not keep:
            continue
        think = re.match(r"<think>\n(.*?)\n</think>\n\n", seg, re.S)
        if think and (not think.group(1) or keys.get("thinking_loss") == "mask"):
            seg = seg[think.end():]
        spans.append(seg)
    return spans


def _spans(tok, ids, labels) -> list[str]:
    out, cur = [], []
    for t, lab in zip(ids.tolist(), labels.tolist(), strict=True):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    return out + ([tok.decode(cur)] if cur else [])


@pytest.fixture(scope="module")
def tok35(tmp_path_factory):
    from transformers import AutoTokenizer

    from qwenvl.tiny import build_tokenizer_dir

    return AutoTokenizer.from_pretrained(build_tokenizer_dir(tmp_path_factory.mktemp("qwen35"), family="qwen3_5"))


@pytest.fixture(scope="module")
def media(repo_root):
    return str(repo_root / "tests" / "golden" / "official-qwen3vl-head" / "media")


def _build(tok, rendering, rec, keys, media):
    b = SampleBuilder(tok, BUDGET, spec=QWEN3_SPEC, model_type="qwen3_5", rendering=rendering)
    fmt = formats.FormatSpec(name="messages", declared=True, **keys)
    return b.build(copy.deepcopy(rec), media, fmt)


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_tokens_are_the_templates_and_labels_the_answers(tok35, media, rendering, case):
    rec, keys = CASES[case]
    sample = _build(tok35, rendering, rec, keys, media)
    text = tok35.apply_chat_template(_reference_messages(rec, rendering), tools=rec.get("tools"), tokenize=False,
                                     chat_template=CHAT_TEMPLATES[rendering], **_reference_kwargs(rec, keys))
    text = _expand(text, sample)
    assert sample["input_ids"].tolist() == tok35(text, add_special_tokens=False)["input_ids"], text
    assert _spans(tok35, sample["input_ids"], sample["labels"]) == _trained_spans(text, rec, keys)


def test_what_the_renderings_differ_in(tok35, media):
    """The cases above say 'equal to the template'; this one says what that means, in words."""
    rec, keys = CASES["multi_turn_inline"]
    text = {r: tok35.decode(_build(tok35, r, rec, keys, media)["input_ids"]) for r in RENDERINGS}
    assert "first thought" not in text["qwen3.5"] and "first thought" not in text["qwen3.6"]  # earlier turn dropped
    assert "<think>\nfirst thought\n</think>\n\nA scene." in text["qwen3.8"]  # kept by Qwen3.8
    assert all("<think>\nsecond thought\n</think>\n\nMostly grey." in t for t in text.values())
    assert text["qwen3.8"].startswith("<|im_start|>system\nReasoning effort is set to xhigh.")
    assert "<think>\n\n</think>\n\n1<|im_end|>" in tok35.decode(  # Qwen3.8's empty block on an earlier turn
        _build(tok35, "qwen3.8", *CASES["no_reasoning_anywhere"], media)["input_ids"])


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_what_the_templates_refuse_is_a_bad_sample(tok35, media, rendering):
    bad = [({"messages": [_u("Q"), {"role": "system", "content": "late"}, _a("A")]}, "system message after"),
           ({"messages": [{"role": "system", "content": "S"}, _a("A")]}, "no user message")]
    if rendering == "qwen3.8":
        bad.append(({"messages": [_u("Q"), _a("A")], "chat_template_kwargs": {"reasoning_effort": "max"}},
                    "reasoning_effort must be one of"))
    for rec, words in bad:
        with pytest.raises(BadSample, match=words):
            _build(tok35, rendering, rec, {}, media)


def test_tools_are_refused_where_vlsft_does_not_render_them(media, tmp_path):
    from transformers import AutoTokenizer

    from qwenvl.tiny import build_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(build_tokenizer_dir(tmp_path, family="qwen3_vl"))
    b = SampleBuilder(tok, BUDGET, spec=QWEN3_SPEC, model_type="qwen3_vl")
    assert b.rendering == "qwen3-vl"
    fmt = formats.FormatSpec(name="messages", declared=True)
    with pytest.raises(BadSample, match="Qwen3.5 / 3.6 / 3.8 chat templates only, not Qwen3-VL's"):
        b.build(copy.deepcopy(CASES["tools"][0]), media, fmt)

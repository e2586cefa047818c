"""Annotation formats (issue 12): detection, normalisers, system prompts, per-turn loss, frame-list videos.

The trainer's own builder (real Qwen2.5-VL tokenizer, real image decoding) on one conversation written in every
format; the deep check (:func:`qwenvl.data.annotations.scan`) on the same records.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwenvl.data import formats
from qwenvl.data.annotations import scan
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget

Q, A = "\nWhat colour is it?", "Green."
OFFICIAL = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>" + Q}, {"from": "gpt", "value": A}]}
SAME = {  # the same conversation in every format
    "messages_tags": {"messages": [{"role": "user", "content": "<image>" + Q}, {"role": "assistant", "content": A}],
                      "images": ["a.png"]},
    "messages_parts": {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                                 {"type": "text", "text": Q}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": A}]}]},
    "messages_bare_parts": {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
                                         {"role": "assistant", "content": A}], "images": "a.png"},
    "openai_image_url": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                                   {"type": "text", "text": Q}]},
                                      {"role": "assistant", "content": A}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "<image>" + Q}, {"from": "gpt", "value": A}],
                 "images": ["a.png"]},
}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    m = tmp_path_factory.mktemp("media")
    Image.new("RGB", (56, 84), (10, 200, 30)).save(m / "a.png")
    for i in range(3):
        Image.new("RGB", (56, 56), (60 * i, 20, 0)).save(m / f"f{i}.png")
    return m


@pytest.fixture(scope="module")
def builder(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), VisionBudget(max_pixels=50176,
                                                                                          min_pixels=784))


def _fmt(rec) -> formats.FormatSpec:
    return formats.settle(None, [(1, rec)])


def _same(a: dict, b: dict) -> bool:
    keys = ("input_ids", "labels", "position_ids", "pixel_values", "image_grid_thw", "pixel_values_videos",
            "video_grid_thw")
    return all((k in a) == (k in b) and (k not in a or bool((a[k] == b[k]).all())) for k in keys)


def test_every_format_builds_the_official_tokens_and_pixels(builder, media):
    ref = builder.build(OFFICIAL, str(media))
    for name, rec in SAME.items():
        fmt = _fmt(rec)
        assert fmt.name == ("sharegpt" if name == "sharegpt" else "messages"), name
        assert _same(builder.build(rec, str(media), fmt), ref), name


def test_detection_and_unknown_shapes():
    assert formats.detect([(1, OFFICIAL)]).name == "official"
    assert formats.detect([(1, {"conversations": []})]).name == "official"
    # one 'images' typo among official samples stays the official format (the typo is a per-sample error)
    assert formats.detect([(1, OFFICIAL), (2, SAME["sharegpt"])]).name == "official"
    assert formats.detect([(1, SAME["sharegpt"]), (2, {"conversations": []})]).name == "sharegpt"
    # a tie between messages and conversations reads as official (its rename hint names 'messages')
    assert formats.detect([(1, SAME["messages_tags"]), (2, OFFICIAL)]).name == "official"
    alpaca = formats.detect([(3, {"instruction": "x", "input": "", "output": "y"})])
    assert alpaca.name is None and alpaca.line == 3 and alpaca.found.startswith("alpaca (instruction/input/output)")


def test_system_prompts(builder, media):
    """messages formats: the sample's system prompt replaces the default; the dictionary's "system" is the
    dataset default; official: the default stays and a system turn inside is a second one (as official)."""
    tok = builder.tokenizer
    rec = {"system": "Be brief.", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    text = tok.decode(builder.build(rec, None, _fmt(rec))["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq") and "helpful" not in text
    as_message = {"messages": [{"role": "system", "content": "Be brief."}, *rec["messages"]]}
    assert _same(builder.build(as_message, None, _fmt(as_message)), builder.build(rec, None, _fmt(rec)))
    both = {**as_message, "system": "Other."}
    with pytest.raises(BadSample, match="top-level 'system' and a different system turn"):
        builder.build(both, None, _fmt(both))
    dataset_default = formats.FormatSpec("messages", system="Dataset prompt.")
    plain = {"messages": rec["messages"]}
    assert tok.decode(builder.build(plain, None, dataset_default)["input_ids"]).startswith(
        "<|im_start|>system\nDataset prompt.<|im_end|>")
    assert "Be brief." in tok.decode(builder.build(rec, None, formats.FormatSpec("messages", system="D."))["input_ids"])
    official = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    text = tok.decode(builder.build(official, None)["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>system\nBe brief.")


def test_loss_false_and_train_on_last(builder):
    conv = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "first"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}]
    tok = builder.tokenizer

    def trained(rec, fmt):
        s = builder.build(rec, None, fmt)
        return tok.decode([int(t) for t in s["labels"] if t != -100])

    rec = {"messages": conv}
    assert trained(rec, _fmt(rec)) == "first<|im_end|>\nsecond<|im_end|>\n"
    masked = {"messages": [conv[0], {**conv[1], "loss": False}, conv[2], {**conv[3], "loss": True}]}
    assert trained(masked, _fmt(masked)) == "second<|im_end|>\n"
    # masking changes the labels only, never the tokens
    assert (builder.build(masked, None, _fmt(masked))["input_ids"] == builder.build(rec, None, _fmt(rec))["input_ids"]).all()
    last = formats.FormatSpec("messages", train_on="last")
    assert trained(rec, last) == "second<|im_end|>\n"
    official = {"conversations": [{"from": t["role"].replace("user", "human").replace("assistant", "gpt"),
                                   "value": t["content"]} for t in conv]}
    assert trained(official, formats.FormatSpec("official", train_on="last")) == "second<|im_end|>\n"
    nothing = {"messages": [conv[0], {**conv[1], "loss": False}]}
    with pytest.raises(BadSample, match="nothing to train on") as e:
        builder.build(nothing, None, _fmt(nothing))
    assert e.value.kind == "no_answer"
    bad = {"messages": [conv[0], {**conv[1], "loss": "no"}]}
    with pytest.raises(BadSample, match="'loss' must be true, false or null"):
        builder.build(bad, None, _fmt(bad))


def test_frame_list_video(builder, media):
    rec = {"messages": [{"role": "user", "content": "<video>Describe."}, {"role": "assistant", "content": "a"}],
           "videos": [["f0.png", "f1.png", "f2.png"]]}
    s = builder.build(rec, str(media), _fmt(rec))
    assert s["video_grid_thw"].tolist() == [[2, 4, 4]]  # 3 frames -> 2 temporal patches (last frame repeated)
    assert s["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per temporal patch at 2 frames per second
    assert int((s["input_ids"] == builder.encoder.video_pad).sum()) == 8
    # the same frames inline as a video part
    inline = {"messages": [{"role": "user", "content": [{"type": "video", "video": ["f0.png", "f1.png", "f2.png"]},
                                                        {"type": "text", "text": "Describe."}]},
                           {"role": "assistant", "content": "a"}]}
    assert _same(builder.build(inline, str(media), _fmt(inline)), s)
    # in the official format a nested list stays what the official code refuses
    official = {"video": [["f0.png"]], "conversations": [{"from": "human", "value": "<video>"},
                                                         {"from": "gpt", "value": "a"}]}
    with pytest.raises(BadSample) as e:
        builder.build(official, str(media))
    assert e.value.kind == "bad_media_field"


@pytest.mark.parametrize("rec, kind, words", [
    ({"messages": [{"role": "function", "content": "x"}, {"role": "assistant", "content": "a"}]}, "bad_conversation",
     "unknown role 'function' (function turns are read as 'tool' results and 'function_call' calls)"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}, {"role": "assistant", "content": "a"}]},
     "bad_conversation", "content part type 'input_audio' is not read"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]},
                   {"role": "assistant", "content": "a"}]}, "media_unreadable", "inline data: URL image is not valid base64"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                   {"role": "assistant", "content": "a"}], "images": ["a.png"]}, "bad_media_field", "both inline"),
    ({"messages": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "a"}],
      "images": ["a.png"]}, "tags_media_mismatch", "2 <image> tag(s) for 1 image(s)"),
    ({"messages": [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "a"}],
      "videos": [["f0.png", "gone.png"]]}, "missing_media", "gone.png"),
    ({"messages": [{"role": "system", "content": "s"}]}, "no_answer", "only a system prompt"),
])
def test_bad_samples_agree_with_the_deep_check(builder, media, tmp_path, rec, kind, words):
    fmt = _fmt(rec)
    with pytest.raises(BadSample, match=None) as e:
        builder.build(rec, str(media), fmt)
    assert e.value.kind == kind and words in str(e.value)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    res = scan(str(path), str(media), workers=1)
    errors = [p for p in res.problems if p.is_error]
    assert res.format == "messages" and errors and res.kinds[errors[0]] == kind
    assert words in errors[0].message and errors[0].line == 1


def test_deep_check_counts_and_media_of_every_format(media, tmp_path):
    recs = [*SAME.values()]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:-1]))  # the messages ones
    res = scan(str(path), str(media), workers=1)
    assert (res.format, res.images, res.text_only, res.media_files, res.missing_media) == ("messages", 4, 0, 1, 0)
    assert not res.problems
    frames = tmp_path / "v.jsonl"
    frames.write_text(json.dumps({"messages": [{"role": "user", "content": "<video>"}, {"role": "assistant",
                                  "content": "a"}], "videos": [["f0.png", "f1.png"], "nope.mp4"]}) + "\n")
    res = scan(str(frames), str(media), workers=1)
    assert (res.videos, res.media_files, res.missing_media) == (1, 3, 1)
    assert [p.message for p in res.problems] == ["1 <video> tag(s) for 2 video(s)",
                                                 f"media file not found: {media}/nope.mp4"]
    assert res.problems[0].key == "videos"  # named as the file names it


def test_unread_media_keys_and_declared_formats(tmp_path):
    from qwenvl.data.annotations import probe

    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({**SAME["messages_tags"], "image": "b.png"}) + "\n")
    info = probe(str(path))
    assert info.format == "messages" and info.unread == {"image": (1, 1)}
    path.write_text(json.dumps(SAME["sharegpt"]) + "\n")
    assert probe(str(path)).format == "sharegpt" and not probe(str(path)).unread
    forced = probe(str(path), fmt=formats.FormatSpec("official", declared=True))
    assert forced.format == "official" and forced.unread == {"images": (1, 1)}
    path.write_text(json.dumps({**OFFICIAL, "image_path": "x/a.jpg", "image_id": 7}) + "\n")
    assert probe(str(path)).unread == {"image_path": (1, 1)}  # metadata such as image_id is not media


def test_normalised_video_parts_use_tuples_only_internally():
    rec = {"messages": [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "a"}],
           "videos": [["a.png", "b.png"]]}
    internal, _, problems = formats.sample_problems(rec, _fmt(rec))
    assert internal["video"] == [("a.png", "b.png")] and not problems
    assert np.asarray(internal["video"][0]).tolist() == ["a.png", "b.png"]


def test_convert_then_pipeline_gives_identical_tokens(builder, media):
    """Property (issue 12): any record the builder accepts and formats.to_official can say gives, converted to
    the official format (its system prompt as the dataset's), the same tokens, labels and pixels."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    texts = st.sampled_from(["q", "", "Describe.", " two  spaces ", "<|im_end|> inside"])

    @st.composite
    def chats(draw):
        n_img = draw(st.integers(0, 2))
        parts = draw(st.booleans())
        user = [{"type": "image", "image": "a.png"}] * n_img + [{"type": "text", "text": draw(texts)}] if parts \
            else "<image>" * n_img + draw(texts)
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": draw(texts)}]
        if draw(st.booleans()):
            turns += [{"role": "user", "content": draw(texts)}, {"role": "assistant", "content": draw(texts)}]
        if draw(st.booleans()):
            turns.insert(0, {"role": "system", "content": draw(st.sampled_from(["Be brief.", ""]))})
        if draw(st.integers(0, 4)) == 0:
            turns = turns[1:] if turns[0]["role"] == "system" else turns
            turns.insert(0, {"role": "assistant", "content": "Hello."})  # a leading answer is kept and trained
        rec: dict = {"messages": turns}
        if n_img and not parts:
            rec["images"] = ["a.png"] * n_img
        if draw(st.booleans()):  # the same as LLaMA-Factory sharegpt
            rec = {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]),
                                      "value": t["content"]} for t in turns], "images": rec.get("images", ["a.png"])}
            if type(turns[-1]["content"]) is not str or any(type(t["content"]) is not str for t in turns) or not n_img:
                rec = {"messages": turns, **({"images": rec["images"]} if n_img and not parts else {})}
        return rec

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
    @given(rec=chats(), last=st.booleans())
    def prop(rec, last):
        fmt = formats.settle(formats.FormatSpec(train_on="last" if last else "all"), [(1, rec)])
        off, system, why = formats.to_official(rec, fmt)
        assert off is not None, why
        official = formats.FormatSpec("official", system=system, train_on=fmt.train_on)
        assert _same(builder.build(off, str(media), official), builder.build(rec, str(media), fmt)), (rec, off)

    prop()


def test_loss_false_in_the_qwen3_layout(tmp_path_factory):
    """The Qwen3 (HEAD) chat layout masks ``loss: false`` turns in the encoder itself, even when a turn's text
    holds a literal ``<|im_start|>`` (masking by token position would shift)."""
    from transformers import AutoTokenizer

    from qwenvl.tiny import build_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(build_tokenizer_dir(tmp_path_factory.mktemp("q3"), family="qwen3_vl"))
    b = SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784), model_type="qwen3_vl")
    conv = [{"role": "user", "content": "q1 <|im_start|> x"}, {"role": "assistant", "content": "first", "loss": False},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "second"}]
    rec = {"messages": conv}
    s = b.build(rec, None, _fmt(rec))
    assert tok.decode([int(t) for t in s["labels"] if t != -100]) == "second<|im_end|>\n"

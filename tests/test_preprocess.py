"""Chat tokens/labels rules and bad-sample reasons (real Qwen tokenizer, real media)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

from qwenvl.data.preprocess import BadSample, ChatEncoder, normalize_conversation
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.vision import MediaError, sample_frame_indices


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def builder(tok):
    return SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784))


def _conv(*turns):
    return [{"from": f, "value": v} for f, v in turns]


def _trained_text(tok, s) -> str:
    return tok.decode([t for t, lab in zip(s["input_ids"].tolist(), s["labels"].tolist(), strict=True) if lab != -100])


def test_text_only_rules(tok, builder):
    s = builder.build({"conversations": _conv(("human", "Hi"), ("gpt", "Hello <image>"), ("human", "More?"),
                                              ("gpt", "Yes"))}, None)
    text = tok.decode(s["input_ids"])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello <image><|im_end|>\n<|im_start|>user\nMore?<|im_end|>\n"
                    "<|im_start|>assistant\nYes<|im_end|>\n")
    # every assistant turn trained from its content through <|im_end|>\n; tags in gpt turns stay text
    assert _trained_text(tok, s) == "Hello <image><|im_end|>\nYes<|im_end|>\n"
    assert s["position_ids"].tolist() == [list(range(len(s["input_ids"])))] * 3


def test_gpt_first_dropped_system_kept_and_role_content_keys(tok, builder):
    s = builder.build({"conversations": [{"from": "gpt", "value": "dropped"}, {"from": "system", "value": "Be brief."},
                                         {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}, None)
    text = tok.decode(s["input_ids"])
    assert "dropped" not in text and "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert _trained_text(tok, s) == "A<|im_end|>\n"
    s2 = builder.build({"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
                       None)
    assert _trained_text(tok, s2) == "A<|im_end|>\n"


@pytest.mark.parametrize("record, reason", [
    ({"conversations": []}, "empty"),
    ({"conversations": _conv(("human", "only a question"))}, "no assistant turn"),
    ({"conversations": _conv(("human", "<image> what?"), ("gpt", "x"))}, "tag"),
    ({"image": "a.png", "conversations": _conv(("human", "what?"), ("gpt", "x"))}, "tag"),
    ({"images": ["a.png"], "conversations": _conv(("human", "<image> what?"), ("gpt", "x"))}, "'images'"),
    ({"image": [], "conversations": _conv(("human", "what?"), ("gpt", "x"))}, "empty list"),
    ({"video": ["v.mp4", "w.mp4"], "conversations": _conv(("human", "<video>"), ("gpt", "x"))}, "tag"),
])
def test_bad_samples_have_reasons(builder, record, reason):
    with pytest.raises(BadSample, match=reason):
        builder.build(record, "/nonexistent")


def test_missing_and_corrupt_media(builder, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    conv = _conv(("human", "<image> what?"), ("gpt", "x"))
    with pytest.raises(MediaError, match="not found"):
        builder.build({"image": "missing.jpg", "conversations": conv}, str(tmp_path))
    with pytest.raises(MediaError, match="cannot read image"):
        builder.build({"image": "broken.jpg", "conversations": conv}, str(tmp_path))
    with pytest.raises(MediaError, match="cannot decode video"):
        builder.build({"video": "broken.mp4", "conversations": _conv(("human", "<video>?"), ("gpt", "x"))},
                      str(tmp_path))


def test_model_max_length_skips_never_cuts(tok, tmp_path):
    Image.new("RGB", (224, 224), (10, 200, 30)).save(tmp_path / "a.png")
    rec = {"image": "a.png", "conversations": _conv(("human", "<image>\nDescribe."), ("gpt", "Green."))}
    ok = SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784)).build(rec, str(tmp_path))
    n = len(ok["input_ids"])
    assert SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784), model_max_length=n).build(
        rec, str(tmp_path))["input_ids"].shape == (n,)
    with pytest.raises(BadSample, match="model_max_length"):
        SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784), model_max_length=n - 1).build(
            rec, str(tmp_path))


def test_user_pixel_budget_takes_effect(tok, tmp_path):
    Image.new("RGB", (1000, 800), (1, 2, 3)).save(tmp_path / "big.png")
    rec = {"image": "big.png", "conversations": _conv(("human", "<image>"), ("gpt", "x"))}
    small = SampleBuilder(tok, VisionBudget(max_pixels=28 * 28 * 16, min_pixels=784)).build(rec, str(tmp_path))
    large = SampleBuilder(tok, VisionBudget(max_pixels=28 * 28 * 256, min_pixels=784)).build(rec, str(tmp_path))
    assert small["image_grid_thw"].prod() * 14 * 14 <= 28 * 28 * 16
    assert 28 * 28 * 128 <= large["image_grid_thw"].prod() * 14 * 14 <= 28 * 28 * 256


def test_frame_sampling_rules():
    # 9 s at interval 2 -> round(4.5) = 4 (half to even); clamp to [min, max]; unique(linspace) truncated
    assert sample_frame_indices(108, 12.0, 2, 4, 8) == [0, 35, 71, 107]
    assert len(sample_frame_indices(240, 24.0, 2, 4, 8)) == 5  # 10 s -> 5 frames (odd: padded later)
    assert sample_frame_indices(3, 1.0, 1, 4, 8) == [0, 1, 2]  # fewer frames than asked: unique


def test_no_tokenizer_copy_fast(tok):
    enc = ChatEncoder(tok)
    turns = normalize_conversation(_conv(("human", "Describe the weather today in detail."), ("gpt", "Sunny " * 50)))
    t0 = time.perf_counter()
    for _ in range(200):
        enc.encode(turns, [], [])
    per_sample = (time.perf_counter() - t0) / 200
    assert per_sample < 0.005, f"{per_sample * 1e3:.2f} ms per sample (the official deep copy: ~335 ms)"

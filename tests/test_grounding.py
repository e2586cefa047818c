"""Grounding (issue 13): ``objects`` rendered in each family's convention, hand-computed values.

Worked example (README "Grounding"): a 1920x1080 image at max_pixels 100352 (min_pixels 3136) is resized to
420x224: beta = sqrt(1920*1080 / 100352) = 4.5457; 1080 / 4.5457 / 28 = 8.49 -> 8*28 = 224,
1920 / 4.5457 / 28 = 15.08 -> 15*28 = 420 (aspect 1.875 instead of 1.778: the resize changes it slightly).
"""

from __future__ import annotations

import random

import pytest
from PIL import Image

from qwenvl.data import formats
from qwenvl.data.grounding import (
    BOX_TOKENS,
    JSON_1000,
    PIXELS,
    convert,
    render_texts,
    rendered_objects,
    smart_resize,
)
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.sample_rules import record_problems

FHD = (1920, 1080)
R100K = (420, 224)  # smart_resize at max_pixels 100352 (hand-computed above)


def test_smart_resize_worked_example_and_transformers_agree():
    assert smart_resize(1080, 1920, 28, 3136, 100352) == (224, 420)
    assert smart_resize(1080, 1920, 28, 3136, 150000) == (280, 504)  # beta 3.718: 10.37 -> 10, 18.44 -> 18
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf

    rng = random.Random(0)
    for _ in range(2000):
        h, w = rng.randint(28, 4000), rng.randint(28, 4000)
        if max(h, w) / min(h, w) > 200:
            continue
        lo, hi = rng.choice([(3136, 100352), (784, 50176), (12544, 451584)])
        for factor in (28, 32):
            assert smart_resize(h, w, factor, lo, hi) == hf(h, w, factor, lo, hi), (h, w, factor, lo, hi)


@pytest.mark.parametrize("fmt,box", [("pixel", [480, 270, 1440, 810]), ("norm1000", [250, 250, 750, 750]),
                                     ("norm1", [0.25, 0.25, 0.75, 0.75])])
def test_each_declared_format_gives_the_same_family_values(fmt, box):
    # Qwen2.5-VL: 480*420/1920 = 105, 270*224/1080 = 56, 1440*420/1920 = 315, 810*224/1080 = 168
    assert convert(box, FHD, R100K, fmt, PIXELS) == [105, 56, 315, 168]
    assert convert(box, FHD, R100K, fmt, BOX_TOKENS) == [250, 250, 750, 750]
    assert convert(box, FHD, R100K, fmt, JSON_1000) == [250, 250, 750, 750]


def test_rounding_half_up_and_clamped_at_the_edges():
    # 100*420/1920 = 21.875 -> 22; 50*224/1080 = 10.37 -> 10; the right/bottom edge is the resized size
    assert convert([100, 50, 1920, 1080], FHD, R100K, "pixel", PIXELS) == [22, 10, 420, 224]
    # 100/1920*1000 = 52.08 -> 52; 50/1080*1000 = 46.3 -> 46; 1919/1920*1000 = 999.48 -> 999
    assert convert([100, 50, 1919, 1080], FHD, R100K, "pixel", BOX_TOKENS) == [52, 46, 999, 1000]
    # halves round up (Python's round() would give 2 and 0): 5 of 2000 px = 2.5 -> 3; 1 of 2000 = 0.5 -> 1
    assert convert([5, 1], (2000, 2000), (2000, 2000), "pixel", JSON_1000) == [3, 1]
    assert convert([5, 1], (2000, 2000), (10, 10), "norm1000", PIXELS) == [0, 0]  # 0.05, 0.01
    # beyond the image: clamped to it
    assert convert([-4, 0, 1930, 1100], FHD, R100K, "pixel", PIXELS) == [0, 0, 420, 224]
    assert convert([-4, 0, 1930, 1100], FHD, R100K, "pixel", JSON_1000) == [0, 0, 1000, 1000]


def test_placeholder_texts_per_family():
    objs = [{"label": "cat", "bbox": [480, 270, 1440, 810]}, {"label": "eye", "point": [960, 540]}]
    texts = ["Where is the <ref>?", "<ref> <bbox>; <ref> <point>"]
    sizes = [(FHD, R100K)]
    r25 = rendered_objects(objs, sizes, "pixel", PIXELS)
    assert render_texts(texts, r25, PIXELS) == ["Where is the cat?", "cat [105, 56, 315, 168]; eye [210, 112]"]
    r2 = rendered_objects(objs, sizes, "pixel", BOX_TOKENS)
    assert render_texts(texts, r2, BOX_TOKENS)[1] == (
        "<|object_ref_start|>cat<|object_ref_end|> <|box_start|>(250,250),(750,750)<|box_end|>; "
        "<|object_ref_start|>eye<|object_ref_end|> <|box_start|>(500,500)<|box_end|>")
    r3 = rendered_objects(objs, sizes, "pixel", JSON_1000)
    assert render_texts(["<objects>"], r3, JSON_1000) == [
        '```json\n[\n  {"bbox_2d": [250, 250, 750, 750], "label": "cat"},\n  {"point_2d": [500, 500], "label": "eye"}\n]\n```']


def test_multi_image_sample_takes_the_box_image():
    objs = [{"label": "a", "bbox": [0, 0, 100, 100], "image": 1}, {"label": "b", "bbox": [0, 0, 100, 100], "image": 0}]
    sizes = [((1000, 1000), (1000, 1000)), ((200, 100), (224, 112))]
    r = rendered_objects(objs, sizes, "pixel", PIXELS)
    assert r[0]["values"] == [0, 0, 112, 112] and r[1]["values"] == [0, 0, 100, 100]
    r = rendered_objects(objs, sizes, "pixel", JSON_1000)
    assert r[0]["values"] == [0, 0, 500, 1000] and r[1]["values"] == [0, 0, 100, 100]


def _rec(objects, answer="<bbox>", images=("a.png",)):
    return {"image": list(images), "objects": objects,
            "conversations": [{"from": "human", "value": "<image>" * len(images) + "<ref>?"},
                              {"from": "gpt", "value": answer}]}


@pytest.mark.parametrize("rec,code", [
    (_rec([{"label": "c", "bbox": [9, 0, 5, 5]}]), "box_order"),
    (_rec([{"label": "c", "bbox": [1, 1, 1, 5]}]), "box_degenerate"),
    (_rec([{"label": "c", "bbox": [1, 1, 5]}]), "object_shape"),
    (_rec([{"bbox": [1, 1, 5, 5]}]), "object_shape"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5], "point": [1, 1]}]), "object_shape"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5]}], answer="none"), "objects_unplaced"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5]}], answer="<bbox> <bbox>"), "objects_count"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5]}], answer="<point>"), "objects_kind"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5]}], images=("a.png", "b.png")), "object_image"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5], "image": 2}], images=("a.png", "b.png")), "object_image"),
    (_rec([{"label": "c", "bbox": [1, 1, 5, 5]}], images=()), "objects_no_image"),
    (_rec("cat"), "objects_type"),
])
def test_structural_problems_are_bad_samples(rec, code):
    if not rec["image"]:
        del rec["image"]
    errors = [p for p in record_problems(rec) if p[0] == "error"]
    assert errors and errors[0][1] == "bad_objects" and errors[0][2] == code, errors


def test_clean_objects_have_no_problem():
    assert record_problems(_rec([{"label": "c", "bbox": [1, 1, 5, 5]}])) == []
    assert record_problems(_rec([{"label": "c", "bbox": [1, 1, 5, 5]}], answer="<objects>")) == []
    assert record_problems(_rec([], answer="plain")) == []


@pytest.fixture(scope="module")
def tokenizer(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def test_builder_renders_with_the_image_resize_and_every_format(tokenizer, tmp_path):
    """The trainer's builder: the messages format passes objects through; tokens hold the rendered text."""
    Image.new("RGB", FHD, (10, 20, 30)).save(tmp_path / "a.png")
    official = _rec([{"label": "cat", "bbox": [480, 270, 1440, 810]}])
    messages = {"images": ["a.png"], "objects": official["objects"],
                "messages": [{"role": "user", "content": "<image><ref>?"}, {"role": "assistant", "content": "<bbox>"}]}
    for model_type, want in (("qwen2_5_vl", "[105, 56, 315, 168]"),
                             ("qwen2_vl", "<|box_start|>(250,250),(750,750)<|box_end|>")):
        b = SampleBuilder(tokenizer, VisionBudget(max_pixels=100352, min_pixels=3136), model_type=model_type)
        for rec, fmt in ((official, formats.OFFICIAL), (messages, formats.FormatSpec("messages"))):
            s = b.build(rec, str(tmp_path), fmt)
            assert s["image_grid_thw"].tolist() == [[1, 16, 30]]  # 224x420 px = the hand-computed resize
            text = tokenizer.decode(s["input_ids"].tolist())
            assert f"<|im_start|>assistant\n{want}<|im_end|>" in text, text
    # the declared convention: the same box given in norm1 renders the same
    norm = _rec([{"label": "cat", "bbox": [0.25, 0.25, 0.75, 0.75]}])
    b = SampleBuilder(tokenizer, VisionBudget(max_pixels=100352, min_pixels=3136))
    s = b.build(norm, str(tmp_path), formats.FormatSpec("official", bbox_format="norm1"))
    assert "assistant\n[105, 56, 315, 168]<|im_end|>" in tokenizer.decode(s["input_ids"].tolist())


def test_prediction_boxes_parsed_per_family_and_mapped_back_to_original_pixels():
    """Item 5's building blocks (``vlsft predict`` is not in the tree yet): render -> parse -> original pixels."""
    from qwenvl.data.grounding import grounding_metrics, iou, match_ious, parse_boxes, to_original, to_pixels

    objs = [{"label": "cat", "bbox": [100, 50, 1919, 1080]}]
    for family in (BOX_TOKENS, PIXELS, JSON_1000):
        r = rendered_objects(objs, [(FHD, R100K)], "pixel", family)
        for text in render_texts(["<objects>", "It is at <bbox>."], r, family):
            boxes = parse_boxes(text, family)
            assert boxes == [[float(v) for v in r[0]["values"]]], (family, text)
            back = to_original(boxes[0], FHD, R100K, family)
            # within half a unit of the family's grid: 1920/420/2 = 2.3 px (Qwen2.5-VL) or 1.92/2 px (0-1000)
            assert all(abs(a - b) <= 2.3 for a, b in zip(back, [100, 50, 1920, 1080], strict=True)), (family, back)
            assert iou(back, [100, 50, 1919, 1080]) > 0.99
    assert parse_boxes("(10,20),(30,40) and <|box_start|>(1,2),(3,4)<|box_end|>", BOX_TOKENS) == [
        [10, 20, 30, 40], [1, 2, 3, 4]]
    assert parse_boxes("no box here", PIXELS) == []
    assert to_pixels([0.25, 0.5], FHD, "norm1") == [480, 540] and to_pixels([250, 500], FHD, "norm1000") == [480, 540]
    # IoU by hand: [0,0,10,10] vs [5,0,15,10]: intersection 50, union 150
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    assert iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0
    # two references, predictions in the other order, one missing: greedy matching, 0 for the unmatched
    assert match_ious([[0, 0, 10, 10], [20, 20, 30, 30]], [[20, 20, 30, 30]]) == [0.0, 1.0]
    ious = match_ious([[0, 0, 10, 10], [20, 20, 30, 30]], [[21, 20, 30, 30], [0, 0, 10, 10]])
    assert ious == [1.0, pytest.approx(0.9)]
    assert grounding_metrics([1.0, 0.9, 0.3, 0.0]) == {"boxes": 4, "iou@0.5": 0.5, "mean_iou": 0.55}

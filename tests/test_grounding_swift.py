"""Issue 23 item 7: ms-swift's grounding ``objects`` ({ref, bbox, bbox_type, image_id} with ``<ref-object>`` /
``<bbox>`` in the text) read as vlsft's own objects, one verdict across check, --deep, preview and the trainer.

ms-swift's rules (its template's ``normalize_bbox`` / ``_pre_tokenize``, its custom-dataset docs): each
``<ref-object>`` takes the next ``ref`` and each ``<bbox>`` the next ``bbox`` (two independent sequences); a bbox
of 2 numbers is a point; ``bbox_type`` "real" (default: pixels of the original image) or "norm1" (0-1);
``image_id[k]`` is the image of bbox k (default 0); reversed corners are swapped. vlsft renders every box in the
model family's convention, as it renders its own objects (docs/grounding.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl.data import formats
from qwenvl.data.annotations import scan
from qwenvl.data.grounding import BOX_TOKENS, JSON_1000, PIXELS, read_swift, render_texts, rendered_objects
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget

CAT = {"ref": ["cat"], "bbox": [[90.9, 160.8, 135, 212.8]], "bbox_type": "real", "image_id": [0]}
SIZES = [((640, 480), (252, 168))]  # cat.png as Qwen2.5-VL sees it at max_pixels 50176


def _swift(objects, user="<image>Find <ref-object>", answer="<bbox>", images=("cat.png",), shape="messages"):
    if shape == "messages":
        rec = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}
    else:
        rec = {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}
    if images:
        rec["image" if shape == "official" else "images"] = list(images)
    if objects is not None:
        rec["objects"] = objects
    return rec


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("swift")
    Image.new("RGB", (640, 480), (200, 120, 40)).save(d / "cat.png")
    Image.new("RGB", (56, 56), (20, 120, 40)).save(d / "b.png")
    return d


@pytest.fixture(scope="module")
def builder(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), VisionBudget(max_pixels=50176,
                                                                                         min_pixels=784))


def _build(builder, rec, folder, fmt=None):
    fmt = fmt or formats.settle(None, [(1, rec)])
    try:
        return builder.build(rec, str(folder), fmt), None
    except BadSample as e:
        return None, e


def _scan(folder: Path, records: list, deep=True, name="a.jsonl"):
    p = folder / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return scan(str(p), str(folder), deep=deep, workers=1)


# ---- the mapping and its rendering ------------------------------------------------------------------------------

def test_objects_map_to_vlsft_objects():
    objs, bad = read_swift({"ref": ["a", "b"], "bbox": [[9, 8, 1, 2], [5, 6]], "bbox_type": "norm1",
                            "image_id": [1, 0]})
    assert bad is None and objs.refs == ["a", "b"]
    assert list(objs) == [{"label": "a", "image": 1, "bbox": [1, 2, 9, 8], "bbox_format": "norm1"},  # swapped
                          {"label": "b", "image": 0, "point": [5, 6], "bbox_format": "norm1"}]
    # Hugging Face rows of an objects column: nulls and empty lists are the defaults (real, image 0, no objects)
    objs, bad = read_swift({"ref": None, "bbox": [[1, 2, 3, 4]], "bbox_type": None, "image_id": []})
    assert bad is None and list(objs) == [{"label": "", "image": 0, "bbox": [1, 2, 3, 4]}]


def test_each_family_renders_the_box_in_its_own_convention():
    """The brief's record: Qwen2.5-VL pixels of the resized image, Qwen2-VL tokens, Qwen3-VL 0-1000."""
    texts = ["Find <ref-object>", "<bbox>"]
    r = rendered_objects(CAT, SIZES, "pixel", PIXELS)
    assert render_texts(texts, r, PIXELS) == ["Find cat", "[36, 56, 53, 74]"]
    r = rendered_objects(CAT, SIZES, "pixel", BOX_TOKENS)
    assert render_texts(texts, r, BOX_TOKENS) == ["Find <|object_ref_start|>cat<|object_ref_end|>",
                                                  "<|box_start|>(142,335),(211,443)<|box_end|>"]
    r = rendered_objects({**CAT, "bbox": [[0.142, 0.335, 0.211, 0.443]], "bbox_type": "norm1"}, SIZES, "pixel",
                         JSON_1000)
    assert render_texts(texts, r, JSON_1000) == ["Find cat", "[142, 335, 211, 443]"]


def test_the_docs_example_renders_as_docs_grounding_md_says():
    """docs/grounding.md's ms-swift example (docs/examples/swift-grounding, second record) per family."""
    from qwenvl.data.grounding import smart_resize

    repo = Path(__file__).resolve().parents[1]
    rec = json.loads((repo / "docs/examples/swift-grounding/park.jsonl").read_text().splitlines()[1])
    h, w = smart_resize(480, 640, max_pixels=100352)
    assert (w, h) == (364, 252)
    page = " ".join((repo / "docs/grounding.md").read_text().split())  # (a bullet may wrap)
    answer = rec["messages"][1]["content"]
    for name, convention in (("Qwen2.5-VL", PIXELS), ("Qwen2-VL", BOX_TOKENS), ("Qwen3-VL", JSON_1000)):
        (text,) = render_texts([answer], rendered_objects(rec["objects"], [((640, 480), (w, h))], "pixel",
                                                          convention), convention)
        assert f"- {name}: `{text}`" in page, text


def test_refs_and_boxes_are_two_independent_sequences():
    objs = {"ref": ["dog", "cat"], "bbox": [[0, 0, 64, 48], [320, 240]]}
    r = rendered_objects(objs, SIZES, "pixel", PIXELS)
    # a box before its ref (captioning), a point, and vlsft's own tags left as text
    assert render_texts(["<bbox> is <ref-object>; <ref-object> at <bbox> <ref> <objects>"], r, PIXELS) == [
        "[0, 0, 25, 17] is dog; cat at [126, 84] <ref> <objects>"]


@pytest.mark.parametrize("shape", ["messages", "sharegpt", "official"])
def test_builds_the_same_tokens_as_the_vlsft_objects(folder, builder, shape):
    swift = _swift(CAT, shape=shape)
    own = _swift([{"label": "cat", "bbox": CAT["bbox"][0]}], user="<image>Find <ref>", shape=shape)
    got, err = _build(builder, swift, folder)
    assert err is None, err
    want, _ = _build(builder, own, folder)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["labels"].tolist() == want["labels"].tolist()
    text = builder.tokenizer.decode(got["input_ids"].tolist())
    assert "Find cat<|im_end|>" in text and "assistant\n[36, 56, 53, 74]<|im_end|>" in text
    official, _, why = formats.to_official(swift, formats.settle(None, [(1, swift)]))  # datasets convert
    assert why == "" and official["objects"] == CAT
    again, _ = _build(builder, official, folder, formats.OFFICIAL)
    assert again["input_ids"].tolist() == got["input_ids"].tolist()


def test_norm1_and_image_id_on_the_second_image(folder, builder):
    rec = _swift({"ref": ["x"], "bbox": [[0.25, 0.25, 0.75, 0.75]], "bbox_type": "norm1", "image_id": [1]},
                 user="<image><image>Find <ref-object>", images=("cat.png", "b.png"))
    own = _swift([{"label": "x", "bbox": [14, 14, 42, 42], "image": 1}], user="<image><image>Find <ref>",
                 images=("cat.png", "b.png"))
    got, err = _build(builder, rec, folder)
    assert err is None, err
    assert got["input_ids"].tolist() == _build(builder, own, folder)[0]["input_ids"].tolist()


def test_text_only_rows_of_an_objects_column_are_text_only(folder, builder):
    empty = {"ref": [], "bbox": [], "bbox_type": None, "image_id": []}
    rec = _swift(empty, user="Hi", answer="Hello", images=())
    res = _scan(folder, [rec])
    assert (res.text_only, [p.render() for p in res.problems]) == (1, [])
    assert _build(builder, rec, folder)[1] is None


# ---- refusals: one line naming the user's key, the same verdict everywhere ------------------------------------------

REFUSED = [
    (_swift({"ref": ["cat", "dog"], "bbox": CAT["bbox"]}), "objects.ref", "has 2 item(s) for 1 <ref-object>"),
    (_swift(CAT, answer="<bbox> <bbox>"), "objects.bbox", "has 1 item(s) for 2 <bbox>"),
    (_swift({**CAT, "image_id": [1]}), "objects.image_id", "'objects.image_id' 1 is not an image index"),
    (_swift({**CAT, "image_id": [0, 0]}), "objects.image_id", "must be a list of 1 integers"),
    (_swift({**CAT, "bbox_type": "norm1000"}), "objects.bbox_type", "unknown 'objects.bbox_type' 'norm1000'"),
    (_swift({**CAT, "bbox": [[1, 2, 3]]}), "objects.bbox", "item 0 must be 4 numbers"),
    (_swift({**CAT, "bbox": [[5, 2, 5, 9]]}), "objects.bbox", "item 0: box [5, 2, 5, 9] has zero width"),
    (_swift({**CAT, "label": "cat"}), "objects", "found the key 'label'"),
    (_swift(CAT, user="Find <ref-object>", images=()), "objects", "without an image"),
]


@pytest.mark.parametrize("rec,key,words", REFUSED, ids=[r[1] + ":" + r[2][:20] for r in REFUSED])
def test_refusals_are_one_line_with_one_advice(folder, builder, rec, key, words):
    res = _scan(folder, [rec])
    errors = [p for p in res.problems if p.is_error]
    assert len(errors) == 1 and errors[0].key == key and words in errors[0].message, [p.render() for p in errors]
    assert errors[0].hint and "\n" not in errors[0].render() and len(errors[0].render()) < 300
    _, err = _build(builder, rec, folder)
    assert err is not None and err.kind == res.kinds[errors[0]] == "bad_objects" and words in str(err)
    plain = _scan(folder, [rec], deep=False)  # plain check: the format read, the sample counted as --deep does
    assert (plain.format, plain.images, plain.text_only) == (res.format, res.images, res.text_only)


def test_deep_check_warns_in_bbox_type_words(folder):
    res = _scan(folder, [_swift({**CAT, "bbox": [[0.1, 0.2, 0.3, 0.4]]})])
    (p,) = res.problems
    assert p.severity == "warning" and "with bbox_type real" in p.message and '"bbox_type": "norm1"' in p.hint


# ---- property: the deep check refuses exactly what the builder refuses, and exactly ms-swift's mismatches -----------

GOOD_BOXES = [[4, 4, 40, 30], [40, 30, 4, 4], [10, 12]]  # a box, reversed corners (swapped), a point
BAD_BOXES = [[1, 2, 3], [5, 5, 5, 9], [0, 0, 2e7, 9], "x"]


@st.composite
def swift_records(draw):
    """Mostly valid records with a few mutations (a count off by one, a bad box / ref / bbox_type / image_id)."""
    n_img = draw(st.sampled_from([1, 1, 1, 2, 0]))
    boxes = draw(st.lists(st.sampled_from(GOOD_BOXES * 6 + BAD_BOXES), max_size=3))
    refs = draw(st.sampled_from([["cat"] * k for k in range(4)] * 3 + [["cat", 3], None]))
    ids = draw(st.sampled_from(["absent", "absent", [], "each", "each", "long"]))
    ids = {"absent": None, "each": draw(st.lists(st.integers(0, 2), min_size=len(boxes), max_size=len(boxes))),
           "long": [0] * (len(boxes) + 1)}.get(ids, ids) if ids != [] else []
    objects = {"ref": refs, "bbox": boxes}
    btype = draw(st.sampled_from(["absent", "absent", None, "", "real", "norm1", "norm1000"]))
    if btype != "absent":
        objects["bbox_type"] = btype
    if ids is not None:
        objects["image_id"] = ids
    a = max(0, len(refs or []) + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
    b = max(0, len(boxes) + draw(st.sampled_from([0, 0, 0, 0, 1, -1])))
    shape = draw(st.sampled_from(["messages", "sharegpt", "official"]))
    rec = _swift(objects, user="<image>" * n_img + "Find " + "<ref-object> " * a, answer="<bbox>" * b + ".",
                 images=["b.png"] * n_img, shape=shape)
    return rec, (refs, boxes, btype, ids, n_img, a, b)


def _ms_swift_refuses(refs, boxes, btype, ids, n_img, a, b) -> bool:
    """ms-swift's rules as its docs state them (written here independently of vlsft's code), plus vlsft's own box
    rules (an area; coordinates below 1e7)."""
    refs, ids = refs or [], ids or []
    if not all(isinstance(r, str) for r in refs) or btype == "norm1000":
        return True
    if not all(isinstance(x, list) and len(x) in (2, 4) for x in boxes) or (ids and len(ids) != len(boxes)):
        return True
    if not refs and not boxes:
        return a != 0 or b != 0
    if n_img == 0 or any(i >= n_img for i in ids):
        return True
    if any(len(x) == 4 and (x[0] == x[2] or x[1] == x[3]) or max(map(abs, x)) > 1e7 for x in boxes):
        return True
    return a != len(refs) or b != len(boxes)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=swift_records())
def test_deep_check_refuses_exactly_what_the_builder_refuses(folder, builder, case):
    rec, facts = case
    fmt = formats.settle(None, [(1, rec)])
    problems = formats.sample_problems(rec, fmt)[2]  # the deep check's rule (scan calls it per record)
    checked = next((p[1] for p in problems if p[0] == "error"), None)
    _, err = _build(builder, rec, folder, fmt)
    event(f"{fmt.name}: {'refused' if checked else 'accepted'}")
    assert checked == (err.kind if err else None), (rec, problems)
    assert (checked is not None) == _ms_swift_refuses(*facts), (rec, problems)
    assert checked in (None, "bad_objects"), problems


# ---- preview: what the trainer builds ----------------------------------------------------------------------------

def test_preview_json_shows_what_the_trainer_builds(folder, builder, qwen_tokenizer_dir):
    from cli_inprocess import vlsft

    rec = _swift({"ref": ["dog", "cat"], "bbox": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5]], "bbox_type": "norm1"},
                 answer="<ref-object> <bbox>, <ref-object> <bbox>")
    rec["messages"][0]["content"] = "<image>Where?"
    _scan(folder, [rec], name="p.jsonl")
    (folder / "d.json").write_text(json.dumps({"p": {"annotation_path": "p.jsonl", "data_path": "."}}))
    (folder / "run.yaml").write_text(f"model:\n  name_or_path: {qwen_tokenizer_dir}\ndata:\n  dictionary: "
                                     f"{folder / 'd.json'}\n  max_pixels: 50176\n  min_pixels: 784\noutput:\n  dir: out\n")
    r = vlsft("datasets", "preview", "--config", str(folder / "run.yaml"), "--dataset", "p", "--index", "0", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    built, err = _build(builder, rec, folder)
    assert err is None and got["input_ids"] == built["input_ids"].tolist() and got["labels"] == built["labels"].tolist()
    assert [(o["label"], o["kind"], o["values"], o["bbox_format"]) for o in got["objects"]] == [
        ("dog", "bbox", [25, 34, 76, 67], "norm1"), ("cat", "point", [126, 84], "norm1")]

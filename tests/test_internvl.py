"""Issue 23 item 5: InternVL's data as it is: its meta JSON as the dataset dictionary, its records' implicit tag.

* The meta JSON (``{"name": {"root", "annotation", "repeat_time", "length", "data_augment", ...}}``) is read as a
  dictionary: ``root`` = data_path, ``annotation`` = annotation_path, ``repeat_time`` as vlsft's (below 1: that
  fraction, as sampling_rate), ``length`` checked; InternVL's tiling / augmentation keys are warned about once.
  Its problems keep file:line:col and name the user's keys (``root``, not ``data_path``).
* Its datasets are read in the ``internvl`` format: official records whose single image / video may lack its tag
  in the first turn (InternVL puts ``<image>\\n`` there); never for an official dataset, where that stays an error.
* One verdict per record across plain check, ``check --deep``, ``preview --json`` and the trainer's builder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_inprocess import vlsft
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from qwenvl.data import formats
from qwenvl.data.annotations import scan
from qwenvl.data.dictionary import load_dictionary
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget

INTERNVL = formats.FormatSpec("internvl", declared=True)


def _conv(first: str, *more: str, system: str | None = None) -> list:
    turns = [{"from": "system", "value": system}] if system is not None else []
    turns += [{"from": "human", "value": first}, {"from": "gpt", "value": "Red."}]
    for i, text in enumerate(more):
        turns.append({"from": "human" if i % 2 == 0 else "gpt", "value": text})
    return turns


# (record, read as InternVL reads it: the conversation's turns after the implicit tag, or None for a bad sample)
CASES = [
    ({"id": 0, "image": "red.png", "width": 56, "height": 84, "conversations": _conv("What colour?")},
     ["<image>\nWhat colour?", "Red."]),
    ({"id": 1, "image": "red.png", "conversations": _conv("<image>\nWhat colour?")}, ["<image>\nWhat colour?", "Red."]),
    ({"id": 2, "image": "red.png", "conversations": _conv("Colour?", system="Be brief.")},
     ["<image>\nColour?", "Red."]),  # the leading system turn is the sample's system prompt (extras.system)
    ({"id": 3, "image": "", "conversations": _conv("Say hi.")}, ["Say hi.", "Red."]),
    ({"id": 4, "conversations": _conv("Say hi.")}, ["Say hi.", "Red."]),
    ({"id": 5, "image": ["red.png", "red.png"], "conversations": _conv("<image>\n<image>\nSame?")},
     ["<image>\n<image>\nSame?", "Red."]),
    # InternVL: several images need their tags (it fails such a sample; so does vlsft)
    ({"id": 6, "image": ["red.png", "red.png"], "conversations": _conv("Same?")}, None),
    # InternVL looks at the first turn only: a tag in a later turn leaves one tag too many
    ({"id": 7, "image": "red.png", "conversations": _conv("Look.", "Now: <image>", "Red.")}, None),
    ({"id": 8, "image": "gone.png", "conversations": _conv("What colour?")}, None),
]


@pytest.fixture(scope="module")
def builder(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
                         VisionBudget(max_pixels=50176, min_pixels=784))


@pytest.fixture()
def meta(tmp_path) -> Path:
    """An InternVL meta JSON as InternVL's shell/data files write it, its records and image."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (56, 84), (200, 30, 30)).save(tmp_path / "images/red.png")
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(r) + "\n" for r, _ in CASES))
    (tmp_path / "meta.json").write_text(
        '{\n'
        '  "red": {"root": "images/", "annotation": "ann.jsonl", "data_augment": false, "max_dynamic_patch": 12,\n'
        '          "repeat_time": 1, "length": 9},\n'
        '  "red_half": {"root": "images/", "annotation": "ann.jsonl", "data_augment": true, "max_dynamic_patch": 6,\n'
        '               "repeat_time": 0.5, "length": 9},\n'
        '  "twice": {"root": "", "annotation": "text.jsonl", "repeat_time": 2}\n'
        '}\n')
    (tmp_path / "text.jsonl").write_text(json.dumps(CASES[4][0]) + "\n")
    return tmp_path


def _build(builder, rec, data_path, fmt):
    try:
        return builder.build(rec, str(data_path), fmt), None
    except BadSample as exc:
        return None, exc


# ---- the meta JSON as the dictionary --------------------------------------------------------------------------

def test_meta_json_is_the_dictionary(meta):
    d = load_dictionary(meta / "meta.json")
    assert d.internvl and d.ok, [p.render() for p in d.problems]
    red, half, twice = d.datasets["red"], d.datasets["red_half"], d.datasets["twice"]
    assert (red.data_path, red.annotation_path, red.length) == (str(meta / "images"), str(meta / "ann.jsonl"), 9)
    assert (red.percent, half.percent, twice.percent) == (100.0, 50.0, 200.0)  # as red_half%50, twice%200
    assert twice.data_path is None  # "root": "" is a text-only dataset's
    assert {s.format_spec.name for s in d.datasets.values()} == {"internvl"}
    assert all(s.format_spec.declared for s in d.datasets.values())
    # InternVL's tiling / augmentation keys: one warning per key for the file, at its first use that matters
    warned = [(p.key, p.line) for p in d.warnings]
    assert warned == [("max_dynamic_patch", 2), ("data_augment", 4)], [p.render() for p in d.warnings]
    assert all("InternVL's" in p.message and p.hint for p in d.warnings)


def test_meta_json_errors_are_one_line_in_its_own_words(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(CASES[0][0]) + "\n")
    (tmp_path / "meta.json").write_text(
        '{"a": {"root": 3, "annotation": "a.jsonl", "repeat_time": 1},\n'
        ' "b": {"root": ".", "annotation": "gone.jsonl"},\n'
        ' "c": {"root": ".", "annotation": "a.jsonl", "repat_time": 1},\n'
        ' "d": {"root": "nowhere/", "annotation": "a.jsonl", "repeat_time": 0}}\n')
    d = load_dictionary(tmp_path / "meta.json")
    got = {(p.line, p.key): p for p in d.errors}
    assert got[(1, "root")].column == 16 and "'root' of dataset 'a' must be a path string" in got[(1, "root")].message
    assert got[(2, "annotation")].message.startswith("annotation file of dataset 'b' not found")
    assert got[(3, "repat_time")].hint == "did you mean 'repeat_time'?"
    assert "must be > 0" in got[(4, "repeat_time")].message
    for p in d.problems:  # one line each, the file's own keys
        line = p.render()
        assert "\n" not in line and line.startswith(f"{tmp_path / 'meta.json'}:{p.line}:{p.column}: ")
        assert "data_path" not in line and "annotation_path" not in line, line


def test_a_vlsft_dictionary_with_a_misspelt_key_is_not_internvl(tmp_path):
    (tmp_path / "d.json").write_text('{"a": {"data_path": ".", "annotation": "a.jsonl"}}')
    d = load_dictionary(tmp_path / "d.json", check_files=False)
    assert not d.internvl and [(p.key, p.hint) for p in d.errors] == [("annotation", "did you mean 'annotation_path'?")]


def test_format_internvl_in_a_vlsft_dictionary(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps(CASES[0][0]) + "\n")
    Image.new("RGB", (28, 28)).save(tmp_path / "red.png")
    (tmp_path / "d.json").write_text(json.dumps({
        "ivl": {"data_path": ".", "annotation_path": "a.jsonl", "format": "internvl"},
        "off": {"data_path": ".", "annotation_path": "a.jsonl"}}))
    d = load_dictionary(tmp_path / "d.json")
    assert d.ok and d.formats == {"ivl": "internvl", "off": "official"}
    # the same record in an official dataset: a missing tag stays the error it is
    off = scan(str(tmp_path / "a.jsonl"), str(tmp_path), fmt=d.datasets["off"].format_spec, workers=1).problems
    assert ["0 <image> tag(s) for 1 image(s)" in p.message for p in off] == [True]
    assert scan(str(tmp_path / "a.jsonl"), str(tmp_path), fmt=d.datasets["ivl"].format_spec, workers=1).problems == []


# ---- one verdict per record: rule, plain check, --deep, builder, preview ---------------------------------------

def test_the_implicit_tag_rule():
    for rec, want in CASES:
        internal, _, problems = formats.sample_problems(rec, INTERNVL)
        bad = [p for p in problems if p[0] == "error"]
        if rec["id"] == 8:  # a missing file: the deep check's media check, not the rule's
            continue
        if want is None:
            assert bad, rec
            continue
        assert not bad, (rec, bad)
        assert [t["value"] for t in internal["conversations"]] == want
        assert "<image>" not in rec["conversations"][0]["value"] or rec["id"] in (1, 5)  # the record is not changed
    # never for official data
    assert [p[2] for p in formats.sample_problems(CASES[0][0], formats.OFFICIAL)[2]] == ["image_tags"]
    # a video (a path) gets <video>
    video = formats.sample_problems({"video": "v.mp4", "conversations": _conv("What happens?")}, INTERNVL)[0]
    assert video["conversations"][0]["value"] == "<video>\nWhat happens?"


def test_check_deep_and_the_builder_give_one_verdict(meta, builder):
    plain = scan(str(meta / "ann.jsonl"), str(meta / "images"), deep=False, fmt=INTERNVL, workers=1)
    deep = scan(str(meta / "ann.jsonl"), str(meta / "images"), deep=True, fmt=INTERNVL, workers=1)
    assert (plain.images, plain.text_only) == (deep.images, deep.text_only) == (7, 2)
    assert [p.render() for p in plain.problems if p.is_error] == []
    bad_lines = {p.line for p in deep.problems if p.is_error}
    built = {}
    for line, (rec, want) in enumerate(CASES, 1):
        out, err = _build(builder, rec, meta / "images", INTERNVL)
        built[line] = out
        assert (err is not None) == (line in bad_lines) == (want is None), (rec, err, bad_lines)
    # the implicit tag gives the tokens of the same record written with it
    explicit, _ = _build(builder, CASES[1][0], meta / "images", formats.OFFICIAL)
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        assert built[1][key].tolist() == explicit[key].tolist(), key
    for p in deep.problems:
        assert "\n" not in p.render() and p.hint is None or "\n" not in p.hint


@st.composite
def internvl_records(draw) -> dict:
    """InternVL-shaped records: one image, a list, none or an empty one; the tag in the first turn, elsewhere, twice
    or not at all; a system turn first or not; from/value or role/content turns."""
    first = draw(st.sampled_from(["What colour?", "<image>\nWhat colour?", "<image><image>Same?", "", "<video>\nq"]))
    later = draw(st.sampled_from([[], ["More?", "Yes."], ["And <image>?", "Yes."]]))
    conv = _conv(first, *later, system=draw(st.sampled_from([None, "Be brief."])))
    if draw(st.booleans()):
        conv = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]}
                for t in conv]
    rec: dict = {"id": draw(st.integers(0, 9)), "conversations": conv}
    image = draw(st.sampled_from(["red.png", "red.png", "gone.png", ["red.png"], ["red.png", "red.png"], "", [],
                                  None, "absent"]))
    if image != "absent":
        rec["image"] = image
    if draw(st.booleans()):
        rec["width"], rec["height"] = 56, 84
    return rec


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(rec=internvl_records())
def test_property_check_and_builder_agree_and_official_data_is_untouched(meta, builder, rec):
    """For any InternVL record: --deep errs exactly when the trainer's builder refuses it; an accepted one holds one
    <image> per image; read as official it gets the same verdict unless InternVL's implicit tag was needed."""
    (meta / "one.jsonl").write_text(json.dumps(rec) + "\n")
    deep = scan(str(meta / "one.jsonl"), str(meta / "images"), deep=True, fmt=INTERNVL, workers=1)
    checked = [p.render() for p in deep.problems if p.is_error]
    out, err = _build(builder, rec, meta / "images", INTERNVL)
    assert bool(checked) == (err is not None), (rec, checked, err)
    internal = formats.sample_problems(rec, INTERNVL)[0]
    event(f"builder {'refused' if err else 'accepted'}, {'read as written' if internal == rec else 'completed'}")
    if err is None:
        images = internal.get("image")
        n = 0 if images is None else 1 if isinstance(images, str) else len(images)
        tags = sum(str(t.get("value", t.get("content"))).count("<image>") for t in internal["conversations"])
        assert tags == n and ("pixel_values" in out) == (n > 0), rec
    official = scan(str(meta / "one.jsonl"), str(meta / "images"), deep=True, fmt=formats.OFFICIAL, workers=1)
    if internal == rec:  # nothing implicit: the formats agree
        assert [p.render() for p in official.problems if p.is_error] == checked, rec


def test_check_and_preview_agree_through_the_cli(meta, qwen_tokenizer_dir, builder):
    r = vlsft("datasets", "check", "--deep", "--json", str(meta / "meta.json"))
    report = json.loads(r.stdout)
    red = next(d for d in report["datasets"] if d["name"] == "red")
    assert red["format"] == "internvl", red
    (meta / "run.yaml").write_text(f"model:\n  name_or_path: {qwen_tokenizer_dir}\ndata:\n  dictionary: meta.json\n"
                                   "  max_pixels: 50176\n  min_pixels: 784\noutput:\n  dir: out\n")
    r = vlsft("datasets", "preview", "--config", str(meta / "run.yaml"), "--dataset", "red", "--index", "0", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    shown = json.loads(r.stdout)
    assert shown["format"] == "internvl"
    assert [t["content"] for t in shown["conversation"] if t["role"] != "system"] == CASES[0][1]
    want, _ = _build(builder, CASES[0][0], meta / "images", INTERNVL)
    assert shown["input_ids"] == want["input_ids"].tolist() and shown["image_grid_thw"] == [[1, 6, 4]]

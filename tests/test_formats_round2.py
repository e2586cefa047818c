"""Issue 23 items 2-3: the remaining record shapes, one verdict per sample across check, --deep, preview, trainer.

* ``"images": []`` on a text-only row (every text-only row of a ``List(Image)`` column) is a text-only sample;
* base64 ``data:`` URL images (OpenAI vision JSONL parts, ms-swift ``images``) are decoded in memory, counted as
  images, and a corrupt one is one line naming the key the user wrote.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from qwenvl.data import formats, sample_rules
from qwenvl.data.annotations import scan
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget


def _png(color=(20, 120, 220), size=(40, 30), fmt="PNG") -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, fmt)
    return b.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


GOOD = _url(_png())
BAD_B64 = "data:image/png;base64,AAA*"
NOT_IMAGE = _url(b"hello, this is text")
TRUNCATED = _url(_png()[:60])


@pytest.fixture(scope="module")
def builder(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    return SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), VisionBudget(max_pixels=50176,
                                                                                         min_pixels=784))


def _msg(images=None, content="<image>What colour?", **extra) -> dict:
    rec = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Blue."}], **extra}
    if images is not None:
        rec["images"] = images
    return rec


def _sharegpt(images) -> dict:
    return {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}], "images": images}


def _openai(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour?"}]},
                         {"role": "assistant", "content": "Blue."}]}


def _scan(tmp_path: Path, records: list, deep=True, decode=False):
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return scan(str(p), str(tmp_path), deep=deep, workers=1, decode=decode)


def _build(builder, rec, data_path, fmt=None):
    fmt = fmt or formats.settle(None, [(1, rec)])
    try:
        return builder.build(rec, str(data_path), fmt), None
    except BadSample as e:
        return None, e


# ---- item 1: "images": [] -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rec", [_sharegpt([]), _msg([], content="Hi"), _msg([], content="Hi", videos=[]),
                                 {**_sharegpt([]), "videos": []}])
def test_empty_images_list_is_text_only_everywhere(tmp_path, builder, rec):
    for deep in (False, True):
        res = _scan(tmp_path, [rec], deep=deep)
        assert (res.text_only, res.images, [p.render() for p in res.problems]) == (1, 0, [])
    out, err = _build(builder, rec, tmp_path)
    assert err is None and "pixel_values" not in out


def test_empty_images_list_in_an_official_dataset_is_no_problem(tmp_path, builder):
    """A text-only row of an official dataset that also carries an empty ``images`` column."""
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
            {"images": [], "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    res = _scan(tmp_path, rows)
    assert (res.images, res.text_only, [p.render() for p in res.problems]) == (1, 1, [])
    assert _build(builder, rows[1], tmp_path, formats.OFFICIAL)[1] is None


def test_rule_messages_name_the_users_key(tmp_path):
    """A problem of the internal record is worded with the dataset's keys: 'images', never 'image'."""
    res = _scan(tmp_path, [_msg([""])])
    (p,) = [p for p in res.problems if p.is_error]
    assert p.key == "images" and "'image'" not in p.render()
    res = _scan(tmp_path, [_msg(["x.png"], content="What colour?")])
    assert "'image'" not in " ".join(p.render() for p in res.problems)


# ---- item 2: data: URLs ----------------------------------------------------------------------------------------

def test_data_url_bytes():
    assert sample_rules.data_url_bytes(GOOD)[0] == _png()
    assert sample_rules.data_url_bytes(_url(_png(fmt="JPEG"), "image/jpeg"))[1] is None
    assert sample_rules.data_url_bytes(GOOD[:30] + "\n" + GOOD[30:])[1] is None  # MIME line breaks
    for url, why in ((BAD_B64, "not valid base64"), (NOT_IMAGE, "holds no PNG"),
                     ("data:image/png," + "x", "not a base64 data: URL"), ("data:text/plain;base64,aGk=", "not an image"),
                     ("data:image/png;base64,", "holds no bytes")):
        assert why in sample_rules.data_url_bytes(url)[1], url
    assert sample_rules.shown(GOOD).endswith(f"({len(GOOD):,} characters)") and len(sample_rules.shown(GOOD)) < 80


@pytest.mark.parametrize("shape", ["openai", "swift", "official"])
def test_data_url_image_is_decoded_in_memory_like_the_file(tmp_path, builder, shape):
    (tmp_path / "blue.png").write_bytes(_png())
    rec = {"openai": _openai(GOOD), "swift": _msg([GOOD]),
           "official": {"image": GOOD, "conversations": [{"from": "human", "value": "<image>What colour?"},
                                                         {"from": "gpt", "value": "Blue."}]}}[shape]
    twin = {"openai": _openai("blue.png"), "swift": _msg(["blue.png"]),
            "official": {**rec, "image": "blue.png"}}[shape]
    before = sorted(os.listdir(tmp_path))
    got, err = _build(builder, rec, tmp_path)
    assert err is None
    want, _ = _build(builder, twin, tmp_path)
    for key in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        assert got[key].tolist() == want[key].tolist(), key
    assert sorted(os.listdir(tmp_path)) == before  # nothing written next to the user's data
    for deep in (False, True):
        res = _scan(tmp_path, [rec], deep=deep)
        assert (res.images, res.text_only, res.media_files, [p.render() for p in res.problems]) == (1, 0, 0, [])


@pytest.mark.parametrize("url,kind", [(BAD_B64, "media_unreadable"), (NOT_IMAGE, "media_unreadable"),
                                      ("data:text/plain;base64,aGk=", "media_unreadable")])
@pytest.mark.parametrize("shape", ["openai", "swift"])
def test_corrupt_data_url_is_one_line_and_the_same_verdict(tmp_path, builder, url, kind, shape):
    rec = _openai(url) if shape == "openai" else _msg([url])
    res = _scan(tmp_path, [rec])
    errors = [p for p in res.problems if p.is_error]
    assert len(errors) == 1 and res.kinds[errors[0]] == kind, [p.render() for p in res.problems]
    assert errors[0].key == ("content" if shape == "openai" else "images")
    assert "data: URL" in errors[0].message and len(errors[0].render()) < 400
    _, err = _build(builder, rec, tmp_path)
    assert err is not None and err.kind == kind


def test_truncated_data_url_is_found_by_decode_and_skipped_by_the_trainer(tmp_path, builder):
    rec = _msg([TRUNCATED])
    assert [p for p in _scan(tmp_path, [rec]).problems if p.is_error] == []  # the bytes look like a PNG ...
    res = _scan(tmp_path, [rec], decode=True)  # ... --decode opens them, as it opens files
    (p,) = [p for p in res.problems if p.is_error]
    assert res.kinds[p] == "media_unreadable" and len(p.render()) < 400
    _, err = _build(builder, rec, tmp_path)
    assert err is not None and err.kind == "media_unreadable" and len(str(err)) < 400


def test_data_url_video_is_decoded_in_memory_like_the_file(tmp_path, builder):
    """HF datasets' embedded videos arrive as data:video/... URLs: decoded from the bytes, as the file would be."""
    from test_check_vs_builder import _write_video

    _write_video(tmp_path / "clip.mp4")
    url = _url((tmp_path / "clip.mp4").read_bytes(), "video/mp4")
    rec = _msg(None, content="<video>What happens?", videos=[url])
    got, err = _build(builder, rec, tmp_path)
    assert err is None
    want, _ = _build(builder, {**rec, "videos": ["clip.mp4"]}, tmp_path)
    for key in ("input_ids", "labels", "pixel_values_videos", "video_grid_thw"):
        assert got[key].tolist() == want[key].tolist(), key
    res = _scan(tmp_path, [rec], decode=True)
    assert (res.videos, res.media_files, [p.render() for p in res.problems]) == (1, 0, [])
    for bad in ("data:video/mp4;base64,AAA*", "data:image/png;base64,AAAA", _url(b"not a video", "video/mp4")):
        rec = _msg(None, content="<video>What happens?", videos=[bad])
        res = _scan(tmp_path, [rec], decode=True)
        (p,) = [p for p in res.problems if p.is_error]
        assert p.key == "videos" and "video" in p.message and res.kinds[p] == "media_unreadable", p.render()
        _, err = _build(builder, rec, tmp_path)
        assert err is not None and err.kind == "media_unreadable" and len(str(err)) < 600


@pytest.mark.slow
def test_cli_check_and_preview_agree_on_data_urls_and_empty_images(tmp_path, qwen_tokenizer_dir, builder):
    rows = [_openai(GOOD), _msg([GOOD]), _msg([], content="Hello"), _msg([], content="Hi"), _msg([NOT_IMAGE])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps({"t": {"annotation_path": "t.jsonl"}}))
    (tmp_path / "run.yaml").write_text(f"model:\n  name_or_path: {qwen_tokenizer_dir}\ndata:\n  dictionary: d.json\n"
                                       "  max_pixels: 50176\n  min_pixels: 784\noutput:\n  dir: out\n")
    from cli_inprocess import vlsft  # in process: the same command code, the imports paid once per session

    plain = json.loads(vlsft("datasets", "check", str(tmp_path / "d.json"), "--json").stdout)
    deep = vlsft("datasets", "check", str(tmp_path / "d.json"), "--deep", "--json")
    (ds,) = plain["datasets"]
    assert (ds["images"], ds["text_only"]) == (3, 2), ds
    problems = json.loads(deep.stdout)["problems"]
    assert [(p["line"], p["key"]) for p in problems if p["severity"] == "error"] == [(5, "images")], problems
    fmt = formats.settle(None, [(1, rows[0])])
    for i, rec in enumerate(rows):
        if i in (1, 3):  # (the same shapes as 0 and 2: one preview run each is enough)
            continue
        r = vlsft("datasets", "preview", "--config", str(tmp_path / "run.yaml"), "--dataset", "t", "--index", str(i),
                  "--json")
        built, err = _build(builder, rec, tmp_path, fmt)
        if err is not None:
            assert r.returncode == 1 and "data: URL" in r.stdout + r.stderr and "Traceback" not in r.stderr, r.stderr
            continue
        assert r.returncode == 0, r.stderr[-2000:]
        got = json.loads(r.stdout)
        assert got["input_ids"] == built["input_ids"].tolist() and got["labels"] == built["labels"].tolist()


# ---- item 3: LLaMA-Factory v1 content parts and loss_weight -----------------------------------------------------

def _v1(*turns, **extra) -> dict:
    return {"messages": [{"role": r, "content": c, **({"loss_weight": w} if w is not None else {})}
                         for r, c, w in turns], **extra}


def _t(value: str) -> list:
    return [{"type": "text", "value": value}]


def test_llamafactory_v1_parts_read_as_the_same_conversation(tmp_path, builder):
    """LF v1's own multimodal demo shape against the same content written with tags."""
    (tmp_path / "1.png").write_bytes(_png())
    v1 = _v1(("system", _t("Be brief."), 0.0),
             ("user", [{"type": "text", "value": "Who are they?"}, {"type": "image_url", "value": "1.png"}], 0.0),
             ("assistant", _t("Two players."), 1.0))
    tags = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are they?<image>"},
                         {"role": "assistant", "content": "Two players."}], "images": ["1.png"]}
    got, err = _build(builder, v1, tmp_path)
    assert err is None
    want, _ = _build(builder, tags, tmp_path)
    for key in ("input_ids", "labels", "pixel_values"):
        assert got[key].tolist() == want[key].tolist(), key
    res = _scan(tmp_path, [v1])
    assert (res.format, res.images, [p.render() for p in res.problems]) == ("messages", 1, [])


def test_loss_weight_zero_masks_like_loss_false(tmp_path, builder):
    def rec(first):
        return {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", **first},
                             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}

    f, _ = _build(builder, rec({"loss": False}), tmp_path)
    plain, _ = _build(builder, rec({}), tmp_path)
    for key in ("loss_weight", "weight"):  # LLaMA-Factory v1's, OpenAI fine-tuning's
        w0, _ = _build(builder, rec({key: 0.0 if key == "loss_weight" else 0}), tmp_path)
        w1, _ = _build(builder, rec({key: 1}), tmp_path)
        assert w0["labels"].tolist() == f["labels"].tolist() != plain["labels"].tolist()
        assert w1["labels"].tolist() == plain["labels"].tolist()
    res = _scan(tmp_path, [rec({"weight": 0})])
    assert [p.render() for p in res.problems if p.is_error] == []


def test_openai_weight_masks_in_convert_and_only_0_or_1(tmp_path):
    from qwenvl.data.formats import to_official

    rec = {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "Wrong.", "weight": 0},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "Right.", "weight": 1}]}
    official, _system, why = to_official(rec, formats.settle(None, [(1, rec)]))
    assert official is None and "masked" in why  # left out, as a 'loss': false turn is
    bad = dict(rec, messages=rec["messages"][:3] + [dict(rec["messages"][3], weight=0.3)])
    (p,) = [p for p in _scan(tmp_path, [bad]).problems if p.is_error]
    assert p.key == "weight" and "'weight' must be 0 (not trained) or 1 (trained)" in p.message
    every = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]}
    (p,) = [p for p in _scan(tmp_path, [every]).problems if p.is_error]
    assert p.key == "weight" and "'weight': 0" in p.message and "'weight': 1" in p.hint


@pytest.mark.parametrize("weight", [0.5, 2, True, "1", None])
def test_other_loss_weights_are_one_line(tmp_path, builder, weight):
    rec = _v1(("user", _t("q"), 0.0), ("assistant", _t("a"), weight))
    res = _scan(tmp_path, [rec])
    errors = [p for p in res.problems if p.is_error]
    _, err = _build(builder, rec, tmp_path)
    if weight is None:  # (not said: trained, as LLaMA-Factory does)
        assert errors == [] and err is None
        return
    assert len(errors) == 1 and errors[0].key == "loss_weight" and "0 (not trained) or 1 (trained)" in errors[0].message
    assert err is not None and err.kind == res.kinds[errors[0]] == "bad_conversation"


def test_every_answer_at_loss_weight_zero_names_loss_weight(tmp_path):
    res = _scan(tmp_path, [_v1(("user", _t("q"), 0.0), ("assistant", _t("a"), 0.0))])
    (p,) = [p for p in res.problems if p.is_error]
    assert p.key == "loss_weight" and "'loss_weight': 0" in p.message


def test_v1_reasoning_and_tool_call_parts():
    call = {"name": "multiply", "arguments": {"a": 6, "b": 8}}
    v1 = _v1(("user", _t("6*8?"), None),
             ("assistant", [{"type": "reasoning", "value": "Multiply."}, {"type": "tool_call", "value": json.dumps(call)}],
              0.0), ("tool", _t("48"), None), ("assistant", _t("48."), None))
    oai = {"messages": [{"role": "user", "content": "6*8?"},
                        {"role": "assistant", "content": "", "reasoning_content": "Multiply.", "loss": False,
                         "tool_calls": [{"type": "function", "function": call}]},
                        {"role": "tool", "content": "48"}, {"role": "assistant", "content": "48."}]}
    fmt = formats.FormatSpec("messages")
    a, ea, pa = formats.sample_problems(v1, fmt)
    b, eb, pb = formats.sample_problems(oai, fmt)
    assert (a, ea.untrained, pa) == (b, eb.untrained, pb) and pa == []
    bad = _v1(("user", _t("q"), None), ("assistant", [{"type": "tool_call", "value": "{not json"}], None))
    (p,) = formats.sample_problems(bad, fmt)[2]
    assert p[2] == "bad_tool_call" and "not JSON" in p[3]
    bad = _v1(("user", [{"type": "reasoning", "value": "x"}, *_t("q")], None), ("assistant", _t("a"), None))
    (p,) = formats.sample_problems(bad, fmt)[2]
    assert "only answers have them" in p[3]


# ---- item 4: TRL prompt-completion --------------------------------------------------------------------------------

TRL = {"prompt": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                  {"role": "assistant", "content": "Blue?"}, {"role": "user", "content": "Sure?"}],
       "completion": [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}], "images": ["1.png"]}


def test_trl_prompt_completion_reads_as_messages_with_the_prompt_untrained(tmp_path, builder):
    (tmp_path / "1.png").write_bytes(_png())
    same = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>What colour?"},
                         {"role": "assistant", "content": "Blue?", "loss": False}, {"role": "user", "content": "Sure?"},
                         {"role": "assistant", "content": "Blue."}], "images": ["1.png"]}
    assert formats.detect([(1, TRL)]).name == "prompt_completion"
    got, err = _build(builder, TRL, tmp_path)
    assert err is None
    want, _ = _build(builder, same, tmp_path)
    for key in ("input_ids", "labels", "pixel_values"):
        assert got[key].tolist() == want[key].tolist(), key
    res = _scan(tmp_path, [TRL])
    assert (res.format, res.images, [p.render() for p in res.problems]) == ("prompt_completion", 1, [])


@pytest.mark.parametrize("rec,key,words", [
    ({"prompt": "The sky is", "completion": " blue."}, "prompt", "plain-text prompt/completion"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": []}, "completion", "found an empty list"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "q2"}]}, "completion",
     "no assistant message"),
    ({"prompt": [{"role": "user", "content": "<image>q"}], "completion": [{"role": "assistant", "content": "a"}],
      "image": ["1.png"]}, "image", "'image' holds one image"),
])
def test_trl_refusals_are_one_line_with_one_advice(tmp_path, builder, rec, key, words):
    res = _scan(tmp_path, [rec])
    errors = [p for p in res.problems if p.is_error]
    assert len(errors) == 1 and errors[0].key == key and words in errors[0].message, [p.render() for p in errors]
    _, err = _build(builder, rec, tmp_path, formats.FormatSpec("prompt_completion"))
    assert err is not None and err.kind == res.kinds[errors[0]] and words in str(err)
    assert "rename 'images' to 'image'" not in errors[0].render() and "add conversations" not in errors[0].render()


@pytest.mark.parametrize("deep", [False, True])
def test_whole_datasets_that_do_not_train_are_one_line_in_plain_check_too(tmp_path, deep):
    """TRL's plain-text form and preference pairs are of a known key shape: plain check must not call them OK."""
    from cli_inprocess import vlsft

    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    data = {"plain": [{"prompt": "The sky is", "completion": " blue."}] * 3,
            "pref": [{"conversations": conv, "chosen": {"from": "gpt", "value": "a"},
                      "rejected": {"from": "gpt", "value": "b"}}] * 2 + [{"conversations": conv}],
            "fine": [{"conversations": conv}] * 2 + [{"prompt": "x", "completion": "y"}]}  # a minority: per sample
    for name, recs in data.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "d.json").write_text(json.dumps({n: {"annotation_path": f"{n}.jsonl"} for n in data}))
    r = vlsft("datasets", "check", str(tmp_path / "d.json"), *(["--deep"] if deep else []))
    assert r.returncode == 1
    lines = [x for x in r.stdout.splitlines() if ": error: " in x and "d.json:" in x]
    assert len(lines) == 2, r.stdout
    assert "dataset 'plain': 3 of the first 3 records are TRL's plain-text prompt/completion" in lines[0]
    assert "(first at plain.jsonl:1)" in lines[0] and "TRL's conversational form" in lines[0]
    assert "dataset 'pref': 2 of the first 3 records are preference pairs ('chosen' / 'rejected')" in lines[1]
    assert "DPOTrainer" in lines[1]


# ---- item 6: no format claimed on a minority's evidence -------------------------------------------------------

def test_detection_names_a_majority_of_unknown_records():
    conv = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    alpaca = {"instruction": "q", "input": "", "output": "a"}
    d = formats.detect([(1, conv), (2, alpaca), (3, alpaca)])
    assert d.name is None and d.line == 2 and d.found.startswith("2 of the first 3 records are alpaca")
    assert formats.detect([(1, conv), (2, conv), (3, alpaca)]).name == "official"  # the rest: bad samples (--deep)
    assert formats.detect([(1, alpaca)]).found.startswith("alpaca")


def test_plain_check_says_which_format_it_read_and_never_ok_on_unknown_records(tmp_path):
    conv = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "mix.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [conv, {"query": "q", "response": "a"},
                                                                               {"query": "q", "response": "a"}]))
    (tmp_path / "trl.jsonl").write_text(json.dumps(TRL) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"mix": {"annotation_path": "mix.jsonl"},
                                                 "trl": {"annotation_path": "trl.jsonl", "data_path": "."}}))
    r = subprocess.run([sys.executable, "-m", "vlsft", "datasets", "check", str(tmp_path / "d.json"), "--json"],
                       capture_output=True, text=True, timeout=120)
    out = json.loads(r.stdout)
    fmt = {d["name"]: d.get("format") for d in out["datasets"]}
    assert fmt == {"mix": None, "trl": "prompt_completion"}, out["datasets"]
    assert r.returncode != 0 and any("2 of the first 3 records are query/response" in p["message"]
                                     for p in out["problems"])

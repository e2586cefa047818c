"""Records as ms-swift, TRL and InternVL read them: ms-swift ``images`` items given as ``{"path"}`` / ``{"bytes",
"path"}`` objects or bare base64 (messages shortened), the default tags of records with media but no tags
(ms-swift's ``_add_default_tags``, TRL's ``prepare_multimodal_messages``) and TRL's singular ``image`` column,
InternVL's leading system turn, and an unknown shape reported once per dataset."""

from __future__ import annotations

import base64
import io
import json

from qwenvl.data import formats
from qwenvl.data.annotation_check import scan
from qwenvl.data.hf_source import data_url
from qwenvl.data.sample_rules import shown


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (28, 28), (200, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()
BIG_PNG = PNG + b"\0" * 400  # PIL stops at IEND: padding makes the base64 longer than ms-swift's 200 characters
B64 = base64.b64encode(BIG_PNG).decode()
MSGS = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}]
NOTAG = [{"role": "user", "content": "Describe the image."}, {"role": "assistant", "content": "A red square."}]
MESSAGES = formats.FormatSpec("messages")


def _read(rec, fmt=MESSAGES):
    internal, extras, problems = formats.sample_problems(rec, fmt)
    return internal, extras, [p for p in problems if p[0] == "error"]


# ---- 6: ms-swift images items as objects, bare base64 ---------------------------------------------------------
def test_swift_path_object_is_read_as_its_path():
    internal, _, errors = _read({"messages": MSGS, "images": [{"path": "red.png"}]})
    assert errors == [] and internal["image"] == ["red.png"]
    internal, _, errors = _read({"messages": MSGS, "images": [{"path": "file:///d/red.png", "bytes": None}]})
    assert errors == [] and internal["image"] == ["/d/red.png"]


def test_swift_bytes_object_wins_over_its_path():
    for payload in (B64, BIG_PNG):
        internal, _, errors = _read({"messages": MSGS, "images": [{"bytes": payload, "path": "gone.png"}]})
        assert errors == [] and internal["image"] == [data_url(BIG_PNG)]
    internal, _, errors = _read({"messages": MSGS, "images": [{"bytes": "not base64!" * 40, "path": None}]})
    (err,) = errors
    assert "is not valid base64" in err[3] and len(err[3]) < 300


def test_bare_base64_image_is_read_but_a_path_never():
    internal, _, errors = _read({"messages": MSGS, "images": [B64]})
    assert errors == [] and internal["image"] == [data_url(BIG_PNG)]
    assert formats.bare_base64_image(B64) == BIG_PNG
    # not images, too short, or with a '.': paths
    assert formats.bare_base64_image(base64.b64encode(b"x" * 400).decode()) is None
    assert formats.bare_base64_image(base64.b64encode(PNG).decode()) is None
    assert formats.bare_base64_image("images/" + "a" * 300 + ".png") is None


def test_bare_base64_in_the_deep_check(tmp_path):
    """The deep check's fast path leaves a long string to the full rule: bare base64 is an image, not a path."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"messages": MSGS, "images": [B64]}) + "\n")
    for decode in (False, True):
        res = scan(str(tmp_path / "a.jsonl"), str(tmp_path), fmt=formats.FormatSpec(), workers=1, decode=decode)
        assert [p.render() for p in res.problems] == [] and res.images == 1


def test_messages_never_print_a_whole_payload(tmp_path):
    long_junk = "Zm9v" * 50_000  # base64 of no image: stays a path, reported as missing
    bad = [{"messages": MSGS, "images": [{"bytes": None, "weird": "x" * 10_000}]},
           {"messages": MSGS, "images": [long_junk]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    res = scan(str(tmp_path / "a.jsonl"), str(tmp_path), fmt=MESSAGES, workers=1)
    errors = [p.render() for p in res.problems if p.is_error]
    assert len(errors) == 2 and all(len(e) < 400 for e in errors), errors
    assert "is not a path" in errors[0] and "media file not found" in errors[1]
    assert "media file not found: Zm9vZm9v" in errors[1] and "(200,000 characters)" in errors[1]
    assert shown({"bytes": "A" * 5000}) == "{'bytes': 'AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA... (5,000 characters)'}"


# ---- 7: default tags -----------------------------------------------------------------------------------------
def test_swift_record_without_tags_gets_them_in_the_first_user_turn():
    rec = {"system": "Be brief.", "messages": NOTAG + [{"role": "user", "content": "More?"},
                                                      {"role": "assistant", "content": "No."}],
           "images": ["a.png", "b.png"], "videos": ["v.mp4"]}
    internal, _, errors = _read(rec)
    assert errors == []
    assert internal["conversations"][0]["content"] == "<video><image><image>Describe the image."
    assert internal["conversations"][2]["content"] == "More?"
    assert rec["messages"][0]["content"] == "Describe the image."  # the record itself is not changed


def test_some_tags_but_fewer_than_media_stays_an_error():
    rec = {"messages": MSGS, "images": ["a.png", "b.png"]}
    (err,) = _read(rec)[2]
    assert "1 <image> tag(s) for 2 image(s)" in err[3] and err[4] == "images"


def test_parts_content_gets_no_default_tags():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": "Red."}], "images": ["a.png"]}
    (err,) = _read(rec)[2]
    assert "0 <image> tag(s) for 1 image(s)" in err[3]


def test_sharegpt_keeps_llamafactory_rule():
    rec = {"conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Red."}],
           "images": ["a.png"]}
    (err,) = _read(rec, formats.FormatSpec("sharegpt"))[2]
    assert "0 <image> tag(s) for 1 image(s)" in err[3]


def test_trl_string_prompt_and_singular_image_column():
    pc = formats.FormatSpec("prompt_completion")
    rec = {"prompt": [{"role": "user", "content": "What colour is the shape?"}],
           "completion": [{"role": "assistant", "content": "Red."}], "images": ["red.png"]}
    internal, _, errors = _read(rec, pc)
    assert errors == [] and internal["conversations"][0]["content"] == "<image>What colour is the shape?"
    single = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
              "completion": [{"role": "assistant", "content": "Red."}], "image": "red.png"}
    internal, _, errors = _read(single, pc)
    assert errors == [] and internal["image"] == ["red.png"]
    assert formats.unread_media_keys(single, pc) == []
    (err,) = _read({**single, "images": ["b.png"]}, pc)[2]
    assert "both 'image' and 'images'" in err[3]
    (err,) = _read({**single, "image": ["a.png", "b.png"]}, pc)[2]  # TRL would read [[a, b]]: one line here
    assert err[4] == "image" and "'image' holds one image" in err[3] and "'images'" in err[5]
    internal, _, errors = _read({**single, "image": None, "prompt": [{"role": "user", "content": "Hi"}]}, pc)
    assert errors == [] and "image" not in internal


def test_default_tags_in_the_deep_check(tmp_path):
    (tmp_path / "red.png").write_bytes(PNG)
    rec = {"messages": NOTAG, "images": ["red.png"]}
    (tmp_path / "a.jsonl").write_text(json.dumps(rec) + "\n")
    res = scan(str(tmp_path / "a.jsonl"), str(tmp_path), fmt=formats.FormatSpec(), workers=1)
    assert [p.render() for p in res.problems] == [] and res.images == 1


# ---- 9: InternVL's system turn -------------------------------------------------------------------------------
def test_internvl_leading_system_turn_replaces_the_default():
    iv = formats.FormatSpec("internvl")
    rec = {"id": 1, "image": "blue.png", "conversations": [{"from": "system", "value": "Short."},
                                                          {"from": "human", "value": "What colour?"},
                                                          {"from": "gpt", "value": "Blue."}]}
    internal, extras, problems = formats.sample_problems(rec, iv)
    assert problems == [] and extras.system == "Short."
    assert internal["conversations"] == [{"from": "human", "value": "<image>\nWhat colour?"},
                                         {"from": "gpt", "value": "Blue."}]
    off, system, why = formats.to_official(rec, iv)
    assert why == "" and system == "Short." and off["conversations"][0]["from"] == "human"
    last = formats.sample_problems(rec, formats.replace(iv, train_on="last"))
    assert last[1].system == "Short." and last[2] == []
    # a system turn later in the conversation stays a turn (InternVL looks at the first only)
    rec2 = {**rec, "conversations": [rec["conversations"][1], rec["conversations"][0], rec["conversations"][2]]}
    assert formats.sample_problems(rec2, iv)[1].system is None


# ---- 16: an unknown shape is one dataset-level line -----------------------------------------------------------
def test_unknown_shape_has_no_per_sample_follow_ups(tmp_path):
    (tmp_path / "alpaca.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b",
                                                       "images": ["red.png"]}) + "\n")
    res = scan(str(tmp_path / "alpaca.jsonl"), str(tmp_path), workers=1)
    assert res.problems == [] and res.fmt_info.format is None and "alpaca" in res.fmt_info.format_found
    from cli_inprocess import vlsft

    (tmp_path / "dict.json").write_text(json.dumps({"alpaca": {"data_path": ".", "annotation_path": "alpaca.jsonl"}}))
    r = vlsft("datasets", "check", "--deep", str(tmp_path / "dict.json"))
    errors = [line for line in (r.stdout + r.stderr).splitlines() if ": error: " in line]
    assert r.returncode == 1 and len(errors) == 1 and "unknown annotation format" in errors[0], r.stdout

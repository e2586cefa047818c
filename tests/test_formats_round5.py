"""Round 5 of reading other tools' data: ``datasets convert`` leaves an unreadable or unknown-format dataset out
(one line, exit 1) and writes the others; qwen-vl-utils' per-part keys (a video part's ``fps``); LLaVA-Video's
``<image>`` tag for its video; a bare-base64 frame's error shortened; ``file://`` media stripped by convert."""

from __future__ import annotations

import json
from pathlib import Path

from cli_inprocess import vlsft

CONV = [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "Red."}]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478da63f8cf"
                    "c0000003010100c9fe92ef0000000049454e44ae426082")


def _convert(tmp_path: Path, entries: dict):
    (tmp_path / "dict.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    r = vlsft("datasets", "convert", str(tmp_path / "dict.json"), "--to", "official", "--out", str(out))
    return r, out


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ---- finding 2: convert and a dataset it cannot read ----------------------------------------------------------
def test_convert_truncated_json_is_left_out_and_the_others_written(tmp_path):
    (tmp_path / "red.png").write_bytes(PNG)
    (tmp_path / "good.jsonl").write_text(json.dumps({"image": "red.png", "conversations": CONV}) + "\n")
    (tmp_path / "trunc.json").write_text('[{"image": "red.png", "conversations": [{"from": "human", "val')
    r, out = _convert(tmp_path, {"good": {"data_path": ".", "annotation_path": "good.jsonl"},
                                 "trunc": {"data_path": ".", "annotation_path": "trunc.json"}})
    assert r.returncode == 1, r.stderr
    assert "warning: left out: " in r.stderr and "trunc.json" in r.stderr and "error" not in r.stderr
    assert set(json.loads((out / "Dataset-Dictionary.json").read_text())) == {"good"}
    assert len(_lines(out / "good.jsonl")) == 1 and not (out / "trunc.jsonl").exists()


def test_convert_unknown_format_and_missing_data_path_are_not_written(tmp_path):
    (tmp_path / "red.png").write_bytes(PNG)
    (tmp_path / "good.jsonl").write_text(json.dumps({"image": "red.png", "conversations": CONV}) + "\n")
    (tmp_path / "mantis.jsonl").write_text(json.dumps({"id": "1", "images": ["red.png"], "conversation": []}) + "\n")
    r, out = _convert(tmp_path, {"good": {"data_path": ".", "annotation_path": "good.jsonl"},
                                 "mantis": {"data_path": ".", "annotation_path": "mantis.jsonl"},
                                 "nodp": {"annotation_path": "good.jsonl"}})
    assert r.returncode == 1, r.stderr
    assert "left out: dataset 'mantis'" in r.stderr and "left out: dataset 'nodp'" in r.stderr
    assert "mantis:" not in r.stdout and "nodp:" not in r.stdout
    assert set(json.loads((out / "Dataset-Dictionary.json").read_text())) == {"good"}


def test_convert_every_dataset_refused_writes_nothing(tmp_path):
    (tmp_path / "trunc.json").write_text('[{"image": "red.png", "conversations": [')
    r, out = _convert(tmp_path, {"trunc": {"data_path": ".", "annotation_path": "trunc.json"}})
    assert r.returncode == 2, r.stderr
    assert not out.exists()


def test_convert_annotations_unreadable_at_conversion_time_are_left_out(tmp_path, monkeypatch):
    """The file read fine when the dictionary was loaded but not when converted (it changed): one line, the
    dataset is left out, the others are written (was: exit 2, nothing written)."""
    from qwenvl.data import annotations

    (tmp_path / "red.png").write_bytes(PNG)
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps({"image": "red.png", "conversations": CONV}) + "\n")
    real = annotations.iter_records

    def flaky(path, *args, **kwargs):
        if str(path).endswith("b.jsonl"):
            raise ValueError("the file changed")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(annotations, "iter_records", flaky)
    r, out = _convert(tmp_path, {"a": {"data_path": ".", "annotation_path": "a.jsonl"},
                                 "b": {"data_path": ".", "annotation_path": "b.jsonl"}})
    assert r.returncode == 1, r.stderr
    assert "b.jsonl: warning: left out: dataset 'b': cannot read annotations: the file changed" in r.stderr
    assert set(json.loads((out / "Dataset-Dictionary.json").read_text())) == {"a"}


# ---- finding 1: qwen-vl-utils' per-part keys ------------------------------------------------------------------
FRAMES = ["f1.jpg", "f2.jpg", "f3.jpg", "f4.jpg"]


def _qvl(part: dict, **rec) -> dict:
    return {**rec, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Colours?"}]},
                                {"role": "assistant", "content": "Four."}]}


def test_video_part_fps_is_the_frame_rate_as_the_record_key_is():
    from qwenvl.data import formats
    from qwenvl.data.sample import frame_fps

    fmt = formats.FormatSpec("messages")
    for key in ("fps", "sample_fps"):
        internal, _, problems = formats.sample_problems(_qvl({"type": "video", "video": FRAMES, key: 1}), fmt)
        assert not problems and frame_fps(internal, fmt) == 1.0
    # the part's own rate wins over the record's
    internal, _, _ = formats.sample_problems(_qvl({"type": "video", "video": FRAMES, "fps": 4}, fps=1), fmt)
    assert frame_fps(internal, fmt) == 4.0
    # a bad rate is the record key's error; two parts at different rates are one line
    _, _, problems = formats.sample_problems(_qvl({"type": "video", "video": FRAMES, "fps": 0}), fmt)
    assert [p[2] for p in problems if p[0] == "error"] == ["bad_fps"]
    two = {"messages": [{"role": "user", "content": [{"type": "video", "video": FRAMES, "fps": 1},
                                                     {"type": "video", "video": FRAMES, "fps": 2}, "Same?"]},
                        {"role": "assistant", "content": "No."}]}
    internal, _, problems = formats.sample_problems(two, fmt)
    assert internal is None and [p[2] for p in problems] == ["bad_fps"]


def test_unapplied_part_keys_are_one_warning_per_dataset_in_the_deep_check(tmp_path):
    from PIL import Image

    from qwenvl.data.annotation_check import scan

    Image.new("RGB", (56, 56), (0, 0, 255)).save(tmp_path / "blue.png")
    recs = [_qvl({"type": "image", "image": "blue.png", "resized_height": 28, "resized_width": 56}),
            _qvl({"type": "image", "image": "blue.png", "max_pixels": 3136}),
            _qvl({"type": "image", "image": "blue.png"})]
    recs += [_qvl({"type": "image", "image": "blue.png", "min_pixels": 784})] * 30
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    from qwenvl.data import formats

    res = scan(str(tmp_path / "q.jsonl"), str(tmp_path), deep=True, fmt=formats.FormatSpec("messages"))
    lines = [p for p in res.problems if "not applied" in p.message]
    assert len(lines) == 1 and lines[0].severity == "warning" and lines[0].line == 1
    assert "'resized_height', 'resized_width'" in lines[0].message and "32 sample(s)" in lines[0].message
    assert not [p for p in res.problems if p.severity == "error"]


# ---- finding 6: a bare-base64 frame in a frame list ------------------------------------------------------------
def test_bare_base64_frame_error_is_shortened(tmp_path):
    import base64

    from qwenvl.data.vision import _missing

    payload = base64.b64encode(PNG * 100).decode()
    err = _missing(str(tmp_path / payload), "image")
    assert err is not None and len(str(err)) < 200 and "characters)" in str(err)
    assert " is cannot" not in str(err)


# ---- finding 11: file:// media in convert's output -------------------------------------------------------------
def test_convert_strips_file_urls_to_paths(tmp_path):
    (tmp_path / "red.png").write_bytes(PNG)
    url = f"file://{tmp_path / 'red.png'}"
    recs = [{"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
             "images": [url]},
            {"image": url, "conversations": CONV}]
    (tmp_path / "a.jsonl").write_text(json.dumps(recs[0]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(recs[1]) + "\n")
    r, out = _convert(tmp_path, {"a": {"data_path": ".", "annotation_path": "a.jsonl"},
                                 "b": {"data_path": ".", "annotation_path": "b.jsonl"}})
    assert r.returncode == 0, r.stderr
    assert _lines(out / "a.jsonl")[0]["image"] == [str(tmp_path / "red.png")]
    assert _lines(out / "b.jsonl")[0]["image"] == str(tmp_path / "red.png")
    assert vlsft("datasets", "check", "--deep", str(out / "Dataset-Dictionary.json")).returncode == 0


# ---- finding 4: LLaVA-Video's <image> tag for its video --------------------------------------------------------
def test_llava_video_image_tag_for_a_video_is_one_error_with_the_fix():
    from qwenvl.data import formats

    rec = {"id": "v1", "video": "clip.mp4", "data_source": "x",
           "conversations": [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "Moves."}]}
    _, _, problems = formats.sample_problems(rec, formats.FormatSpec("official"))
    errors = [p for p in problems if p[0] == "error"]
    assert len(errors) == 1 and "write <video>" in errors[0][5]

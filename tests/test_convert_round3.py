"""`vlsft datasets convert`: the dictionary's thinking_loss / reasoning_effort are kept, samples whose media files are
missing and videos given as a frame folder (from another format) are left out, and a catalogue with unreadable
entries is converted without them (each listed)."""

from __future__ import annotations

import json
from pathlib import Path

from cli_inprocess import vlsft

CONV = [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}]
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415478da63f8cf"
                    "c0000003010100c9fe92ef0000000049454e44ae426082")


def _convert(tmp_path: Path, dictionary: str = "dict.json"):
    out = tmp_path / "out"
    r = vlsft("datasets", "convert", str(tmp_path / dictionary), "--to", "official", "--out", str(out))
    return r, out


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_thinking_loss_and_reasoning_effort_are_kept(tmp_path):
    rec = {"messages": [{"role": "user", "content": "17x3?"},
                        {"role": "assistant", "content": "<think>\n17x3=51\n</think>\n\n51"}]}
    (tmp_path / "think.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({"think": {"annotation_path": "think.jsonl",
                                                              "thinking_loss": "mask", "reasoning_effort": "low"}}))
    r, out = _convert(tmp_path)
    assert r.returncode == 0, r.stderr
    entry = json.loads((out / "Dataset-Dictionary.json").read_text())["think"]
    assert (entry["thinking_loss"], entry["reasoning_effort"]) == ("mask", "low")


def test_missing_media_left_out_with_a_reason(tmp_path):
    (tmp_path / "red.png").write_bytes(PNG)
    recs = [{"messages": CONV, "images": ["red.png"]}, {"messages": CONV, "images": ["gone.png"]},
            {"image": "gone.png", "conversations": [{"from": "human", "value": "<image>Hi"},
                                                   {"from": "gpt", "value": "Hello"}]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    (tmp_path / "b.jsonl").write_text(json.dumps(recs[2]) + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({"a": {"data_path": ".", "annotation_path": "a.jsonl"},
                                                    "b": {"data_path": ".", "annotation_path": "b.jsonl"}}))
    r, out = _convert(tmp_path)
    assert r.returncode == 1, r.stderr
    assert "a.jsonl:2: warning: left out: bad sample: media file not found: " in r.stderr
    assert f"{tmp_path / 'gone.png'}" in r.stderr and "b.jsonl:1: warning: left out" in r.stderr
    assert [x["image"] for x in _lines(out / "a.jsonl")] == [["red.png"]]
    assert (out / "b.jsonl").read_text() == ""
    assert "Traceback" not in r.stderr


def test_frame_folder_video_of_another_format_left_out(tmp_path):
    (tmp_path / "clip").mkdir()
    for i in range(2):
        (tmp_path / "clip" / f"f{i}.png").write_bytes(PNG)
    conv = [{"role": "user", "content": "<video>What moves?"}, {"role": "assistant", "content": "A square."}]
    (tmp_path / "v.jsonl").write_text(json.dumps({"messages": conv, "videos": ["clip"]}) + "\n"
                                      + json.dumps({"messages": conv, "videos": [["clip/f0.png", "clip/f1.png"]]})
                                      + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({"v": {"data_path": ".", "annotation_path": "v.jsonl"}}))
    r, out = _convert(tmp_path)
    assert r.returncode == 1, r.stderr
    assert "v.jsonl:1: warning: left out: a video given as a folder of frame images, which the official format " \
           "cannot say" in r.stderr
    assert "v.jsonl:2: warning: left out: a video given as frame images" in r.stderr
    assert (out / "v.jsonl").read_text() == ""


def test_catalogue_with_unreadable_entries(tmp_path):
    (tmp_path / "red.png").write_bytes(PNG)
    rec = {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "Red."}],
           "images": ["red.png"]}
    (tmp_path / "mllm.json").write_text(json.dumps([rec]))
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    info = {"mllm_demo": {"file_name": "mllm.json", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "images": "images"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}},
            "alpaca_en_demo": {"file_name": "alpaca.json"},
            "dpo_demo": {"file_name": "mllm.json", "formatting": "sharegpt", "ranking": True}}
    (tmp_path / "dataset_info.json").write_text(json.dumps(info, indent=2))
    r, out = _convert(tmp_path, "dataset_info.json")
    assert r.returncode == 1, r.stderr
    warnings = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(warnings) == 2 and all(": warning: " in x and "left out: dataset '" in x for x in warnings), r.stderr
    assert "alpaca_en_demo" in warnings[0] and "dpo_demo" in warnings[1]
    assert list(json.loads((out / "Dataset-Dictionary.json").read_text())) == ["mllm_demo"]
    assert len(_lines(out / "mllm_demo.jsonl")) == 1


def test_catalogue_with_nothing_readable_still_fails(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca.json"}}))
    r, out = _convert(tmp_path, "dataset_info.json")
    assert r.returncode == 2 and not out.exists()
    assert ": error: " in r.stderr

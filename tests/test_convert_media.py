"""`vlsft datasets convert` writes embedded media (a parquet dataset's image bytes, base64 data: URLs) as files the
official trainer can open: one file per distinct content, the converted samples preview exactly as the originals."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from cli_inprocess import vlsft  # noqa: E402
from test_hf_datasets import _png, _rows, _table  # noqa: E402

from qwenvl.data import hf_source  # noqa: E402


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parquet_images_become_files(tmp_path, qwen_tokenizer_dir):
    rows = _rows(9)
    rows[7]["images"] = rows[1]["images"]  # the same picture twice: one file
    pq.write_table(_table(rows), tmp_path / "train.parquet", row_group_size=4)
    (tmp_path / "dict.json").write_text(json.dumps({"pq": {"annotation_path": "train.parquet"}}))
    out = tmp_path / "out"
    r = vlsft("datasets", "convert", str(tmp_path / "dict.json"), "--to", "official", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "pq: messages -> official, 9 sample(s) written, 5 embedded media file(s) written to" in r.stdout
    entry = json.loads((out / "Dataset-Dictionary.json").read_text())["pq"]
    assert entry["data_path"] == "pq-media" and entry["length"] == 9  # relative: the folder can be moved
    files = sorted(p.name for p in (out / "pq-media").iterdir())
    assert len(files) == 5 and all(f.endswith(".png") for f in files)
    originals = [json.loads(line) for line in hf_source.iter_lines(str(tmp_path / "train.parquet"))]
    for got, want in zip(_records(out / "pq.jsonl"), originals, strict=True):
        if not want["images"]:
            assert "image" not in got
            continue
        name = got["image"][0]
        data = (out / "pq-media" / name).read_bytes()
        assert _data_url(data) == want["images"][0]
        assert name.startswith(hashlib.sha256(data).hexdigest()[:24])
    moved = tmp_path / "moved"
    shutil.move(str(out), moved)
    r = vlsft("datasets", "check", str(moved / "Dataset-Dictionary.json"), "--deep", "--decode")
    assert r.returncode == 0, r.stdout + r.stderr
    # the same sample before and after: the same tokens, labels and pixels
    got = {}
    for name, dictionary in (("pq", tmp_path / "dict.json"), ("pq", moved / "Dataset-Dictionary.json")):
        r = vlsft("datasets", "preview", "--model", str(qwen_tokenizer_dir), "--dictionary", str(dictionary),
                  "--dataset", name, "--index", "4", "--json")
        assert r.returncode == 0, r.stderr
        got[str(dictionary)] = json.loads(r.stdout)
    before, after = got.values()
    assert before["image_grid_thw"] == [[1, 8, 8]]
    for key in ("input_ids", "labels", "image_grid_thw", "pixel_values"):
        assert after[key] == before[key], key


def test_mixed_media_and_a_broken_data_url(tmp_path):
    """Files stay where they are (data_path kept); extracted ones are named by their path in the output folder; a
    sample whose data: URL does not decode is left out with its line, and nothing of it is written."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((1, 2, 3)))
    conv = [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "No."}]
    good = _data_url(_png((9, 9, 9)))
    lines = [{"image": ["a.png", good], "conversations": conv},
             {"image": ["a.png", "data:image/png;base64,@@@"], "conversations": conv},
             {"image": [good, good], "conversations": conv}]
    (tmp_path / "ann.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tmp_path / "dict.json").write_text(json.dumps({"mix": {"data_path": "img", "annotation_path": "ann.jsonl"}}))
    out = tmp_path / "out"
    r = vlsft("datasets", "convert", str(tmp_path / "dict.json"), "--to", "official", "--out", str(out))
    assert r.returncode == 1
    assert f"{tmp_path / 'ann.jsonl'}:2" in r.stderr and "left out: bad sample: an inline data: URL image is not valid base64" in r.stderr
    assert "2 sample(s) written, 1 left out, 1 embedded media file(s)" in r.stdout
    entry = json.loads((out / "Dataset-Dictionary.json").read_text())["mix"]
    assert entry["data_path"] == str(tmp_path / "img")
    recs = _records(out / "mix.jsonl")
    (name,) = [p.name for p in (out / "mix-media").iterdir()]
    extracted = str(out.resolve() / "mix-media" / name)
    assert recs[0]["image"] == ["a.png", extracted] and recs[1]["image"] == [extracted, extracted]
    r = vlsft("datasets", "check", str(out / "Dataset-Dictionary.json"), "--deep", "--decode")
    assert r.returncode == 0, r.stdout + r.stderr


def test_dictionary_keys_the_trainer_reads_are_kept(tmp_path):
    conv = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A square."}]
    (tmp_path / "clip").mkdir()
    for i in range(2):
        (tmp_path / "clip" / f"f{i}.png").write_bytes(_png((i, 0, 0)))
    (tmp_path / "v.jsonl").write_text(json.dumps({"video": "clip", "conversations": conv}) + "\n")
    entry = {"data_path": ".", "annotation_path": "v.jsonl", "frame_fps": 1.5, "repeat_time": 2}
    (tmp_path / "dict.json").write_text(json.dumps({"v": entry}))
    r = vlsft("datasets", "convert", str(tmp_path / "dict.json"), "--to", "official", "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "out" / "Dataset-Dictionary.json").read_text())["v"]
    assert (got["frame_fps"], got["repeat_time"], got["data_path"]) == (1.5, 2, str(tmp_path))

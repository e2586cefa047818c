"""A video given as a folder of frame images (issue 23 item 6: LLaVA-Video, ShareGPTVideo, InternVL).

``"video": "clips/c1/"`` (or without the slash, or a ``videos`` item, or an inline video part) reads the folder's
image files in natural order exactly as the same frames given as a list; the frame rate comes from the record
(``sample_fps`` / ``fps``), else the dictionary's ``frame_fps``, else 2; a folder without images is one line in
``check --deep``, ``preview`` and the builder. Small PNG frames in tmp_path, the builder and the CLI in process.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cli_inprocess import vlsft
from PIL import Image
from s3server import s3_env, s3_server  # noqa: F401  (fixtures)

from qwenvl.data import formats
from qwenvl.data.annotations import scan
from qwenvl.data.media_exist import frame_files, natural_key
from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget

ORDER = ["frame_1.png", "frame_2.png", "frame_3.JPG", "frame_10.png", "frame_11.png"]  # natural order
Q, A = "Describe.", "A clip."
OFFICIAL_CONV = [{"from": "human", "value": "<video>\n" + Q}, {"from": "gpt", "value": A}]


def _messages(**media) -> dict:
    return {"messages": [{"role": "user", "content": "<video>\n" + Q}, {"role": "assistant", "content": A}], **media}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """clips/c1: five distinct random frames (+ a text file, a hidden image, a subfolder: not frames);
    clips/empty: nothing; clips/junk: no image."""
    m = tmp_path_factory.mktemp("media")
    c1 = m / "clips" / "c1"
    (c1 / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ORDER:
        Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(c1 / name, format="PNG")
    (c1 / "notes.txt").write_text("not a frame")
    Image.new("RGB", (56, 56)).save(c1 / ".hidden.png")
    (m / "clips" / "empty").mkdir()
    (m / "clips" / "junk").mkdir()
    (m / "clips" / "junk" / "README").write_text("x")
    return m


@pytest.fixture(scope="module")
def builder(qwen_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    return SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784, video_max_frames=4))


def _build(builder, rec: dict, media: Path) -> dict:
    return builder.build(rec, str(media), formats.settle(None, [(1, rec)]))


def test_natural_order_and_what_counts_as_a_frame(media):
    names = ["f10.png", "f9.png", "f010.png", "f1.png", "a.png", "f2b.png", "f2a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "f1.png", "f2a.png", "f2b.png", "f9.png", "f010.png",
                                              "f10.png"]
    paths, why = frame_files(str(media / "clips" / "c1"))
    assert why is None and [Path(p).name for p in paths] == ORDER  # no .txt, no hidden file, no subfolder
    assert frame_files(str(media / "clips" / "c1") + "/") == (paths, None)
    assert frame_files(str(media / "clips" / "empty"))[1].startswith("an empty folder")
    assert frame_files(str(media / "clips" / "junk"))[1].startswith("a folder with no image files (1 other entry")


def test_a_folder_reads_as_the_same_frames_given_as_a_list(builder, media):
    """Every way of naming the folder builds the sample of the frame list in natural order (thinned to
    video_max_frames 4 the same way): pixels, grid, tokens, labels, positions, second_per_grid_ts exactly."""
    want = _build(builder, _messages(videos=[[f"clips/c1/{n}" for n in ORDER]]), media)
    assert want["video_grid_thw"].tolist() == [[2, 4, 4]] and want["frame_idx"] == [[0, 1, 2, 4]]
    ways = {
        "official": {"video": "clips/c1/", "conversations": OFFICIAL_CONV},
        "official_no_slash": {"video": "clips/c1", "conversations": OFFICIAL_CONV},
        "official_absolute": {"video": [str(media / "clips" / "c1")], "conversations": OFFICIAL_CONV},
        "messages": _messages(videos=["clips/c1/"]),
        "sharegpt": {"conversations": OFFICIAL_CONV, "videos": ["clips/c1"]},
        "inline_part": {"messages": [{"role": "user", "content": [{"type": "video", "video": "clips/c1/"},
                                                                  {"type": "text", "text": "\n" + Q}]},
                                     {"role": "assistant", "content": A}]},
    }
    for name, rec in ways.items():
        got = _build(builder, rec, media)
        for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "input_ids", "labels",
                    "position_ids"):
            assert got[key].equal(want[key]), (name, key)
        assert got["frame_idx"] == want["frame_idx"], name


def test_frame_rate_from_the_record_then_the_dictionary_then_2(builder, media):
    """second_per_grid_ts = 2 frames per temporal patch / the frames' rate (5 frames, 4 kept: the kept rate is
    4 / (5 / fps)), for frame folders and frame lists alike; a video file keeps its own rate."""
    def spg(rec, fmt=None):
        return _build(builder, rec, media)["second_per_grid_ts"].item() if fmt is None else builder.build(
            rec, str(media), fmt)["second_per_grid_ts"].item()

    folder = {"video": "clips/c1/", "conversations": OFFICIAL_CONV}
    assert spg(folder) == pytest.approx(2 / (4 / 2.5))  # 2 frames per second
    assert spg({**folder, "fps": 1}) == pytest.approx(2 / (4 / 5))
    assert spg({**folder, "sample_fps": 4, "fps": 1}) == pytest.approx(2 / (4 / 1.25))  # qwen-vl-utils' name first
    frames = _messages(videos=[[f"clips/c1/{n}" for n in ORDER]], fps=1)
    assert spg(frames) == pytest.approx(2 / (4 / 5))
    fmt = formats.FormatSpec("official", frame_fps=0.5)  # the dataset's rate (dictionary "frame_fps")
    assert spg(folder, fmt) == pytest.approx(2 / (4 / 10))
    assert spg({**folder, "fps": 1}, fmt) == pytest.approx(2 / (4 / 5))  # the record wins


def test_the_dictionary_frame_fps(media, tmp_path, qwen_tokenizer_dir):
    """``frame_fps`` of a dictionary entry reaches the samples (preview: 5 frames at 0.5 per second, 2 per temporal
    patch: 4 s); a rate that is not a positive number is one dictionary error."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"video": "clips/c1/", "conversations": OFFICIAL_CONV}) + "\n")
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"a": {"data_path": str(media), "annotation_path": "a.jsonl", "frame_fps": 0.5}}))
    r = vlsft("datasets", "preview", "--model", str(qwen_tokenizer_dir), "--dictionary", str(d), "--dataset", "a")
    assert r.returncode == 0 and "frames [0, 1, 2, 3, 4]; second_per_grid_ts 4\n" in r.stdout, r.stdout + r.stderr
    d.write_text(json.dumps({"a": {"data_path": str(media), "annotation_path": "a.jsonl", "frame_fps": 0}}))
    r = vlsft("datasets", "check", str(d), "--json")
    assert r.returncode == 1 and [p["message"] for p in json.loads(r.stdout)["problems"]] == [
        "'frame_fps' of dataset 'a' must be > 0, got 0"], r.stdout


def test_frame_rate_sets_qwen3vl_timestamps(media, tmp_path):
    from transformers import AutoTokenizer

    from qwenvl.tiny import build_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(build_tokenizer_dir(tmp_path / "q3", family="qwen3_vl"))
    b3 = SampleBuilder(tok, VisionBudget(video_max_frames=4, video_min_pixels=784, video_max_pixels=50176),
                       model_type="qwen3_vl")
    rec = {"video": "clips/c1/", "conversations": OFFICIAL_CONV}
    assert b3.build(rec, str(media))["video_timestamps"] == [[0.25, 1.5]]  # frames 0,1 and 2,4 at 2 per second
    assert b3.build({**rec, "fps": 1}, str(media))["video_timestamps"] == [[0.5, 3.0]]


@pytest.mark.parametrize("fps", [0, -1, "2", True, None])
def test_a_bad_frame_rate_is_one_verdict(builder, media, tmp_path, fps):
    rec = {"video": "clips/c1/", "fps": fps, "conversations": OFFICIAL_CONV}
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    errors = [p for p in scan(str(path), str(media), workers=1).problems if p.is_error]
    if fps is None:  # null: not given
        assert not errors and _build(builder, rec, media)["second_per_grid_ts"].item() == pytest.approx(1.25)
        return
    with pytest.raises(BadSample) as e:
        _build(builder, rec, media)
    assert e.value.kind == "bad_media_field" and "'fps' must be a positive number" in str(e.value)
    assert [(p.line, p.message) for p in errors] == [(1, str(e.value).split(" (hint")[0])]


def test_a_folder_without_frames_is_one_line_everywhere(builder, media, tmp_path, qwen_tokenizer_dir):
    """check --deep, --decode, preview and the builder: one error line naming the sample and the folder."""
    recs = [{"video": "clips/c1/", "conversations": OFFICIAL_CONV},
            {"video": "clips/empty", "conversations": OFFICIAL_CONV},
            _messages(videos=["clips/junk/"])]
    (tmp_path / "a.jsonl").write_text(json.dumps(recs[0]) + "\n" + json.dumps(recs[1]) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(recs[2]) + "\n")
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"a": {"data_path": str(media), "annotation_path": "a.jsonl"},
                             "b": {"data_path": str(media), "annotation_path": "b.jsonl"}}))
    empty = f"{media}/clips/empty is an empty folder (a video given as frames needs its image files)"
    junk = f"{media}/clips/junk/ is a folder with no image files (1 other entry"
    for extra in ((), ("--decode",)):
        r = vlsft("datasets", "check", str(d), "--deep", "--json", *extra)
        assert r.returncode == 1, r.stdout + r.stderr
        got = [(Path(p["file"]).name, p["line"], p["message"]) for p in json.loads(r.stdout)["problems"]]
        assert [g[:2] for g in got] == [("a.jsonl", 2), ("b.jsonl", 1)], got
        assert got[0][2] == f"media file {empty}" and got[1][2].startswith(f"media file {junk}"), got
    r = vlsft("datasets", "preview", "--model", str(qwen_tokenizer_dir), "--dictionary", str(d), "--dataset", "a",
              "--index", "1")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0] == (
        f"{tmp_path}/a.jsonl:2: error: bad sample (skipped in training): video folder {empty}"), r.stdout + r.stderr
    for rec, words in zip(recs[1:], (empty, junk), strict=True):  # the trainer's builder
        with pytest.raises(BadSample) as e:
            _build(builder, rec, media)
        assert e.value.kind == "missing_media" and str(e.value).startswith(f"video folder {words}"), str(e.value)


def test_decode_opens_every_frame(media, tmp_path):
    """--decode opens each frame of a folder as an image: a broken frame is named."""
    clip = tmp_path / "clip"
    clip.mkdir()
    Image.new("RGB", (56, 56), (1, 2, 3)).save(clip / "0001.png")
    (clip / "0002.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"video": "clip", "conversations": OFFICIAL_CONV}) + "\n")
    assert not scan(str(path), str(tmp_path), workers=1).problems
    res = scan(str(path), str(tmp_path), workers=1, decode=True)
    assert len(res.problems) == 1 and res.problems[0].key == "video" and res.problems[0].message.startswith(
        f"cannot decode video {clip}: a folder of frames whose frame 0002.png is not a readable image")


def test_a_folder_on_object_storage(builder, media, tmp_path, s3_env):  # noqa: F811
    """An S3 prefix of frames (with or without its trailing slash) reads as the local folder; the deep check lists
    it and names a prefix without images."""
    bucket = s3_env.make_bucket()
    s3_env.upload_dir(media / "clips", bucket, "data/clips")
    base = f"s3://{bucket}/data"
    want = _build(builder, {"video": "clips/c1/", "conversations": OFFICIAL_CONV}, media)
    for rel in ("clips/c1/", "clips/c1"):
        got = builder.build({"video": rel, "conversations": OFFICIAL_CONV}, base)
        assert got["pixel_values_videos"].equal(want["pixel_values_videos"]) and got["frame_idx"] == want["frame_idx"]
    with pytest.raises(BadSample, match=f"video folder {base}/clips/junk/ is a folder with no image files"):
        builder.build({"video": "clips/junk/", "conversations": OFFICIAL_CONV}, base)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"video": v, "conversations": OFFICIAL_CONV}) + "\n"
                            for v in ("clips/c1/", "clips/c1", "clips/junk/", "clips/gone/")))
    res = scan(str(path), base, workers=1)
    assert [(p.line, p.message) for p in res.problems] == [
        (3, f"media file {base}/clips/junk/ is a folder with no image files (1 other entry; frames are .jpg, .jpeg, "
            ".png, .bmp, .webp, .gif, .tif, .tiff files)"),
        (4, f"media file {base}/clips/gone/ is an empty folder or not found (a video given as frames needs its "
            "image files)")]

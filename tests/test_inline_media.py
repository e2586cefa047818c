"""Media that are not files beside ``data_path``: inline base64 ``data:`` images (OpenAI / ms-swift JSONL, parquet
bytes reached through a LLaMA-Factory catalogue, which always has a ``data_path``) and videos given as frame
images (a list, or a folder). ``datasets preview`` and ``predict`` open them as the trainer does, through the real
CLI on the tiny model."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

VLSFT = str(Path(sys.executable).with_name("vlsft"))


def _png(colour, size=(56, 56)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inline_dict(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inline")
    url = "data:image/png;base64," + base64.b64encode(_png((200, 20, 20))).decode()
    (d / "red.png").write_bytes(_png((200, 20, 20)))
    frames = d / "clip"
    frames.mkdir()
    for i in range(4):
        (frames / f"{i:03d}.png").write_bytes(_png((20 * i, 100, 100)))
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "What colour is this?"}]},
                      {"role": "assistant", "content": "Red."}]},
        {"messages": [{"role": "user", "content": "<video>What happens?"}, {"role": "assistant", "content": "Fade."}],
         "videos": [["clip/000.png", "clip/001.png", "clip/002.png", "clip/003.png"]]},
        {"messages": [{"role": "user", "content": "<video>And here?"}, {"role": "assistant", "content": "Fade."}],
         "videos": ["clip"]},
        {"messages": [{"role": "user", "content": "<image>What colour is this?"}, {"role": "assistant", "content": "Red."}],
         "images": ["red.png"]},
    ]
    (d / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = d / "Dataset-Dictionary.json"  # a data_path, as every LLaMA-Factory catalogue entry has one
    path.write_text(json.dumps({"mixed": {"data_path": str(d), "annotation_path": "mixed.jsonl"}}))
    return path


def _run(*args, timeout=300):
    return subprocess.run([VLSFT, *args], capture_output=True, text=True, timeout=timeout)


def test_preview_opens_an_inline_image_and_frame_videos_under_a_data_path(inline_dict, tiny_model_dir):
    base = ["datasets", "preview", "--model", str(tiny_model_dir), "--dictionary", str(inline_dict),
            "--dataset", "mixed", "--json"]
    p = _run(*base, "--index", "0")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    inline = json.loads(p.stdout)
    file = json.loads(_run(*base, "--index", "3").stdout)  # the same PNG as a file beside the annotations
    assert inline["image_grid_thw"] == file["image_grid_thw"] and len(inline["image_grid_thw"]) == 1
    assert inline["input_ids"] == file["input_ids"] and inline["pixel_values"] == file["pixel_values"]
    videos = []
    for index in (1, 2):  # the frame list and the frame folder are the same 4-frame video
        p = _run(*base, "--index", str(index))
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        videos.append(json.loads(p.stdout)["video_grid_thw"])
    assert videos[0] == videos[1] and videos[0][0][0] == 2  # 4 frames = 2 temporal patches


def test_predict_answers_inline_images_and_frame_videos(inline_dict, tiny_model_dir, tmp_path):
    out = tmp_path / "preds.jsonl"
    p = _run("predict", str(tiny_model_dir), "--dataset", "mixed", "--dictionary", str(inline_dict),
             "--out", str(out), "--max-new-tokens", "1")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3]  # none dropped: the video rows keep their frames

    from qwenvl import infer
    from qwenvl.data.vision import FRAME_FPS

    engine = infer.Inference(model=None, processor=None, folder=tiny_model_dir)
    frames = sorted(str(x) for x in (inline_dict.parent / "clip").iterdir())
    for video in (frames, str(inline_dict.parent / "clip")):
        (part, _text) = engine.messages("Q", videos=[video], frame_fps=1.0)[0]["content"]
        assert part["video"] == ["file://" + f for f in frames] and part["sample_fps"] == 1.0
    (part, _text) = engine.messages("Q", videos=[frames])[0]["content"]
    assert part["sample_fps"] == FRAME_FPS
    with pytest.raises(infer.InferError, match="media file"):
        engine.messages("Q", videos=[str(inline_dict.parent / "nope.mp4")])

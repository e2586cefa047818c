"""``vlsft chat`` refuses inputs it cannot use in one ``error:`` line, exit 2, no traceback (Trust, round 3),
through the real CLI on the tiny model folder: pixel limits that cannot hold (checked before the model loads),
a ``--video`` that is not a video (named), a prompt longer than the model's positions (the count and the limit)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
IMAGE = REPO / "configs" / "demo" / "images" / "red_square.png"
VIDEO = REPO / "configs" / "demo" / "videos" / "moving_square.mp4"


def chat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "chat", *args, "--max-new-tokens", "2"], capture_output=True, text=True,
                          timeout=240, cwd=REPO)


def one_error(p: subprocess.CompletedProcess, *needles: str, alone: bool = True) -> str:
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-4000:])
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, p.stderr
    if alone:  # refused before anything else ran: nothing else on stderr or stdout
        assert p.stderr.strip() == errors[0] and not p.stdout.strip(), p.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_max_pixels_below_min_pixels_is_one_line(tiny_model_dir):
    p = chat(str(tiny_model_dir), "hi", "--image", str(IMAGE), "--max-pixels", "1000", "--min-pixels", "5000")
    one_error(p, "--max-pixels 1000 is below --min-pixels 5000", "raise --max-pixels or lower --min-pixels")


def test_max_pixels_below_the_smallest_image_is_one_line(tiny_model_dir):
    p = chat(str(tiny_model_dir), "hi", "--image", str(IMAGE), "--max-pixels", "1000")
    one_error(p, "--max-pixels 1000 is below the smallest image size", "3136")


def test_max_pixels_below_the_runs_min_pixels_is_one_line(tmp_path, tiny_model_dir):
    """A run's saved processor carries its min_pixels: --max-pixels below it alone is refused, naming it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, symlinks=True)
    pre = json.loads((model / "preprocessor_config.json").read_text())
    pre["size"] = {"shortest_edge": 50176, "longest_edge": 200704}
    (model / "preprocessor_config.json").write_text(json.dumps(pre))
    p = chat(str(model), "hi", "--image", str(IMAGE), "--max-pixels", "12544")
    one_error(p, "--max-pixels 12544 is below the run's min_pixels 50176")


@pytest.mark.parametrize("make,needle", [
    (lambda d: (d / "clip.mp4").write_text("not a video\n"), "is not a video"),
    (lambda d: shutil.copy(IMAGE, d / "clip.mp4"), "is an image (png), not a video: use --image"),
])
def test_video_that_is_not_a_video_is_one_line_naming_it(tmp_path, tiny_model_dir, make, needle):
    make(tmp_path)
    p = chat(str(tiny_model_dir), "hi", "--video", str(tmp_path / "clip.mp4"))
    one_error(p, str(tmp_path / "clip.mp4"), needle)


def test_missing_video_is_one_line(tmp_path, tiny_model_dir):
    p = chat(str(tiny_model_dir), "hi", "--video", str(tmp_path / "none.mp4"))
    one_error(p, f"media file {tmp_path / 'none.mp4'} not found")


def test_video_problem_accepts_a_real_video():
    from qwenvl import infer

    assert infer.video_problem(str(VIDEO)) is None
    assert infer.pixel_limits_problem(VIDEO.parent, 3136, 3136) is None


@pytest.mark.slow
def test_prompt_longer_than_the_models_positions_is_refused(tiny_model_dir):
    limit = json.loads((tiny_model_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
    prompt = "7" * (limit + 10)  # one token per digit in the Qwen tokenizers
    p = chat(str(tiny_model_dir), prompt)
    line = one_error(p, f"but the model has {limit:,} positions", "max_position_embeddings", "shorten the prompt",
                     alone=False)
    count = int(line.split("the prompt is ")[1].split(" tokens")[0].replace(",", ""))
    assert count > limit, line
    assert not p.stdout.strip()  # nothing was answered


def test_answers_never_run_past_the_models_positions(caplog):
    """prompt + answer within max_position_embeddings: the answer budget is cut (a warning), a prompt that leaves
    no room is one InferError line - for chat's generate and predict's generate_batch alike."""
    import logging

    from transformers import AutoModelForImageTextToText

    from qwenvl.infer import Inference, InferError
    from qwenvl.tiny import tiny_config

    cfg = tiny_config("qwen2_5_vl")
    cfg.text_config.max_position_embeddings = 100
    engine = Inference(model=AutoModelForImageTextToText.from_config(cfg), processor=None, folder=None)
    assert engine.answer_budget(40, 20) == 20
    with caplog.at_level(logging.WARNING, logger="qwenvl.infer"):
        assert engine.answer_budget(90, 20) == 10
    assert "cut at 10 tokens" in caplog.text
    with pytest.raises(InferError, match="100 positions"):
        engine.answer_budget(100, 5)

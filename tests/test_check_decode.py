"""`vlsft datasets check --deep --decode`: real planted bad media files, found before training, one line each."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image
from test_check_vs_builder import _write_video
from test_cli_imports import run_probe

from qwenvl.data.preprocess import BadSample
from qwenvl.data.sample import SampleBuilder, VisionBudget


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (PIL reads the size without decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _plant(media: Path) -> None:
    media.mkdir()
    img = Image.new("RGB", (96, 64))
    for x in range(96):
        img.putpixel((x, x % 64), (x * 2, 255 - x, 90))
    img.save(media / "good.png")
    img.save(media / "good.jpg", quality=90)
    _write_video(media / "good.mp4")
    (media / "zero.png").write_bytes(b"")
    (media / "zero.mp4").write_bytes(b"")
    jpg = (media / "good.jpg").read_bytes()
    (media / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = (media / "good.png").read_bytes()
    (media / "cut.png").write_bytes(png[: len(png) - 30])
    (media / "noise.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (media / "text.jpg").write_text("this is not an image\n")
    (media / "bomb.png").write_bytes(_png_bomb(20_000, 20_000))
    (media / "noise.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    mp4 = (media / "good.mp4").read_bytes()
    (media / "cut.mp4").write_bytes(mp4[:200])


GOOD = ["good.png", "good.jpg"]
BAD_IMAGES = ["zero.png", "cut.jpg", "cut.png", "noise.png", "text.jpg", "bomb.png"]
BAD_VIDEOS = ["zero.mp4", "noise.mp4", "cut.mp4"]


def _records() -> list[dict]:
    def img(p):
        return {"image": p, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}

    def vid(p):
        return {"video": p, "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "a"}]}

    # (a PNG named as a video is a one-frame video to PyAV and to the trainer: not an error)
    return ([img(p) for p in GOOD] + [vid("good.mp4")] + [img(p) for p in BAD_IMAGES] + [vid(p) for p in BAD_VIDEOS]
            + [vid("good.png")])


@pytest.fixture()
def planted(tmp_path) -> Path:
    _plant(tmp_path / "media")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    d = tmp_path / "d.json"
    d.write_text(json.dumps({"t": {"data_path": "media", "annotation_path": "t.jsonl"}}))
    return d


def test_decode_reports_each_bad_file_at_its_sample(planted, tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlsft", "datasets", "check", str(planted), "--deep", "--decode"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if ": error: " in line]
    ann, m = tmp_path / "t.jsonl", tmp_path / "media"
    want = {4: f"[image] cannot decode image {m}/zero.png: an empty file (0 bytes)",
            5: f"[image] cannot decode image {m}/cut.jpg: ",  # PIL's "Truncated File Read" or our end-marker test
            6: f"[image] cannot decode image {m}/cut.png: not a readable image",
            7: f"[image] cannot decode image {m}/noise.png: not a readable image",
            8: f"[image] cannot decode image {m}/text.jpg: not a readable image",
            9: f"[image] cannot decode image {m}/bomb.png: over PIL's decompression-bomb limit of "
               f"{Image.MAX_IMAGE_PIXELS:,} pixels",
            10: f"[video] cannot decode video {m}/zero.mp4: an empty file (0 bytes)",
            11: f"[video] cannot decode video {m}/noise.mp4: not a readable video",
            12: f"[video] cannot decode video {m}/cut.mp4: not a readable video"}
    assert len(errors) == len(want), r.stdout
    for line, (n, text) in zip(errors, sorted(want.items()), strict=True):
        assert line.startswith(f"{ann}:{n}: error: {text}"), (line, n)
    assert "runcated" in errors[1]
    # without --decode the same files all exist: no error at all
    r = subprocess.run([sys.executable, "-m", "vlsft", "datasets", "check", str(planted), "--deep"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout


def test_decode_agrees_with_the_builder(planted, tmp_path, qwen_tokenizer_dir):
    """Every file --decode flags is one the trainer's builder skips as media_unreadable; the good ones build."""
    from transformers import AutoTokenizer

    builder = SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
                            VisionBudget(max_pixels=50176, min_pixels=784))
    recs = _records()
    for i, rec in enumerate(recs):
        if i < 3 or i == len(recs) - 1:
            builder.build(rec, str(tmp_path / "media"))
            continue
        with pytest.raises(BadSample) as ei:
            builder.build(rec, str(tmp_path / "media"))
        assert ei.value.kind == "media_unreadable", (rec, str(ei.value))


def test_decode_in_parallel_stays_light(planted, tmp_path, monkeypatch):
    """A process pool (forced to 2 workers on a few files) gives the same lines; no torch/transformers import."""
    monkeypatch.setenv("VLSFT_CHECK_WORKERS", "2")
    code, heavy, _, _, out = run_probe("datasets", "check", str(planted), "--deep", "--decode", "--json")
    assert code == 1 and heavy == []
    probs = json.loads(out)["problems"]
    assert [p["line"] for p in probs] == list(range(4, 13))


def test_decode_many_files_uses_the_pool(tmp_path):
    from qwenvl.data.media_decode import decode_all

    media = tmp_path / "m"
    media.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    items = []
    for i in range(200):
        p = media / f"{i}.png"
        p.write_bytes(buf.getvalue() if i % 50 else b"")
        items.append((str(p), False))
    seen = []
    bad = decode_all(items, progress=lambda done, total: seen.append((done, total)))
    assert sorted(bad) == sorted((str(media / f"{i}.png"), False) for i in (0, 50, 100, 150))
    assert seen[-1] == (200, 200) and len(seen) == 7


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_a_truncated_gif_bmp_tiff_or_webp_is_flagged_as_the_builder_skips_it(tmp_path, qwen_tokenizer_dir, fmt):
    """PIL's verify() reads only the headers of these formats: --decode decodes the pixels, as the trainer does."""
    from transformers import AutoTokenizer

    from qwenvl.data.media_decode import _image_problem

    img = Image.new("RGB", (300, 300))
    for x in range(300):
        img.putpixel((x, (7 * x) % 300), (x % 256, 255 - x % 256, 90))
    good, cut = tmp_path / f"good.{fmt.lower()}", tmp_path / f"cut.{fmt.lower()}"
    img.save(good, format=fmt)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert _image_problem(str(good)) is None
    assert _image_problem(str(cut)) is not None
    builder = SampleBuilder(AutoTokenizer.from_pretrained(qwen_tokenizer_dir),
                            VisionBudget(max_pixels=50176, min_pixels=784))
    rec = {"image": cut.name, "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(BadSample) as ei:
        builder.build(rec, str(tmp_path))
    assert ei.value.kind == "media_unreadable"
    builder.build({**rec, "image": good.name}, str(tmp_path))

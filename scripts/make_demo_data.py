"""Regenerate the bundled demo dataset in ``configs/demo/`` (committed; < 1 MB in total).

    python scripts/make_demo_data.py [OUT_DIR]      # default: configs/demo

Writes small PNG images (coloured shapes), one short mp4 (a moving square, PyAV + libx264), three
annotation files in the official format (image QA, video QA, text-only QA) and a
``Dataset-Dictionary.json`` naming them. The answers are short and fixed, so a tiny model can
memorise them in a few dozen steps (the demo's loss visibly falls).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 30)}
SHAPES = ["square", "circle"]


def make_image(colour: str, shape: str, size: int = 56) -> Image.Image:
    img = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(img)
    box = (size // 6, size // 6, size - size // 6, size - size // 6)
    if shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.ellipse(box, fill=COLOURS[colour])
    return img


def make_video(path: Path, frames: int = 8, size: int = 56, fps: int = 4) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "30"}
        for i in range(frames):
            arr = np.full((size, size, 3), 240, dtype=np.uint8)
            x = 4 + i * (size - 20) // max(frames - 1, 1)
            arr[20:36, x:x + 16] = COLOURS["red"]
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    image_samples = []
    for colour in COLOURS:
        for shape in SHAPES:
            name = f"{colour}_{shape}.png"
            make_image(colour, shape).save(out / "images" / name, optimize=True)
            image_samples.append({
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": f"The {shape} is {colour}."},
                ],
            })
    make_video(out / "videos" / "moving_square.mp4")
    video_samples = [
        {"video": "moving_square.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhich way does the square move?"},
            {"from": "gpt", "value": "The red square moves from left to right."}]},
        {"video": "moving_square.mp4", "conversations": [
            {"from": "human", "value": "<video>\nWhat colour is the moving square?"},
            {"from": "gpt", "value": "It is red."}]},
    ]
    facts = [("What is the capital of France?", "Paris."), ("What is two plus two?", "Four."),
             ("Name a primary colour.", "Red."), ("What do bees make?", "Honey."),
             ("How many legs does a spider have?", "Eight."), ("What is frozen water called?", "Ice.")]
    text_samples = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in facts]

    (out / "shapes.json").write_text(json.dumps(image_samples, indent=1) + "\n")
    (out / "clips.json").write_text(json.dumps(video_samples, indent=1) + "\n")
    (out / "facts.jsonl").write_text("".join(json.dumps(s) + "\n" for s in text_samples))
    dictionary = {
        "shapes": {"data_path": "images", "annotation_path": "shapes.json", "length": len(image_samples)},
        "clips": {"data_path": "videos", "annotation_path": "clips.json", "length": len(video_samples)},
        "facts": {"data_path": ".", "annotation_path": "facts.jsonl", "length": len(text_samples)},
    }
    (out / "Dataset-Dictionary.json").write_text(json.dumps(dictionary, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.1f} KiB)")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "configs" / "demo")

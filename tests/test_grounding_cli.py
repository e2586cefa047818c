"""Grounding through the real CLI (issue 13): preview under tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL, ``--draw``, and
``datasets check --deep`` on planted problems."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inprocess import vlsft as vlsft_in_process
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BOX = [480, 270, 1440, 810]  # the blue object in a 1920x1080 white image


def _vlsft(*args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "vlsft", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def _object_image(path: Path) -> None:
    im = Image.new("RGB", (1920, 1080), (255, 255, 255))
    ImageDraw.Draw(im).rectangle([BOX[0], BOX[1], BOX[2] - 1, BOX[3] - 1], fill=(0, 0, 255))
    im.save(path)


@pytest.fixture(scope="module")
def models(tiny_model_dir) -> dict:
    from qwenvl.tiny import ensure_tiny_model

    cache = REPO / ".cache"
    return {"qwen2.5vl": tiny_model_dir, "qwen2vl": ensure_tiny_model(cache / "tiny-qwen2_vl", family="qwen2_vl"),
            "qwen3vl": ensure_tiny_model(cache / "tiny-qwen3_vl", family="qwen3_vl")}


@pytest.fixture()
def ground(tmp_path) -> Path:
    _object_image(tmp_path / "obj.png")
    rec = {"image": "obj.png", "objects": [{"label": "cat", "bbox": BOX}],
           "conversations": [{"from": "human", "value": "<image>\nWhere is the <ref>?"},
                             {"from": "gpt", "value": "<bbox>"}]}
    (tmp_path / "g.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "dict.json").write_text(json.dumps({"g": {"data_path": ".", "annotation_path": "g.jsonl"}}))
    return tmp_path


def _run_yaml(folder: Path, model: Path, max_pixels: int) -> Path:
    p = folder / f"run-{model.name}-{max_pixels}.yaml"
    p.write_text(f"model:\n  name_or_path: {model}\ndata:\n  dictionary: dict.json\n  max_pixels: {max_pixels}\n"
                 "  min_pixels: 3136\noutput:\n  dir: out\n")
    return p


def _preview(folder, model, max_pixels, env, *extra):
    """A successful preview of sample 0 (in process: cli_inprocess; the refusals below stay subprocesses)."""
    r = vlsft_in_process("datasets", "preview", "--config", str(_run_yaml(folder, model, max_pixels)), "--dataset",
                         "g", "--index", "0", *extra)
    assert r.returncode == 0, r.stderr
    return r


@pytest.mark.slow
def test_same_annotation_each_family_convention_and_only_qwen25_moves_with_max_pixels(ground, models, cli_env):
    from transformers import AutoTokenizer

    want = {  # hand-computed (tests/test_grounding.py): 100352 -> 420x224, 150000 -> 504x280
        "qwen2.5vl": {100352: [105, 56, 315, 168], 150000: [126, 70, 378, 210]},
        "qwen2vl": {100352: [250, 250, 750, 750], 150000: [250, 250, 750, 750]},
        "qwen3vl": {100352: [250, 250, 750, 750], 150000: [250, 250, 750, 750]},
    }
    answer_text = {"qwen2.5vl": "[{0}, {1}, {2}, {3}]", "qwen3vl": "[{0}, {1}, {2}, {3}]",
                   "qwen2vl": "<|box_start|>({0},{1}),({2},{3})<|box_end|>"}
    for family, model in models.items():
        tok = AutoTokenizer.from_pretrained(model)
        answers = {}
        for mp in (100352, 150000):
            got = json.loads(_preview(ground, model, mp, cli_env, "--json").stdout)
            assert [o["values"] for o in got["objects"]] == [want[family][mp]], (family, mp, got["objects"])
            text = tok.decode(got["input_ids"])
            answers[mp] = text[text.rindex("assistant\n"):]
            assert answer_text[family].format(*want[family][mp]) in answers[mp], (family, text)
            user = next(t["content"] for t in got["conversation"] if t["role"] == "user")
            assert ("<|object_ref_start|>cat<|object_ref_end|>" if family == "qwen2vl" else "the cat?") in user
        if family == "qwen2.5vl":
            assert answers[100352] != answers[150000]
        else:
            assert answers[100352] == answers[150000], family  # the normalised grid ignores the resize
    # Qwen2-VL: the box really is the special tokens, not their text spelled out
    tok = AutoTokenizer.from_pretrained(models["qwen2vl"])
    got = json.loads(_preview(ground, models["qwen2vl"], 100352, cli_env, "--json").stdout)
    assert tok.convert_tokens_to_ids("<|box_start|>") in got["input_ids"]
    assert tok.convert_tokens_to_ids("<|object_ref_start|>") in got["input_ids"]


def test_preview_draw_puts_the_box_on_the_object(ground, models, cli_env):
    out = ground / "seen.png"
    r = _preview(ground, models["qwen2.5vl"], 100352, cli_env, "--draw", str(out))
    assert "object 'cat': bbox [105, 56, 315, 168]" in r.stdout and "1920x1080 -> 420x224" in r.stdout
    im = Image.open(out).convert("RGB")
    assert im.size == (420, 224)  # the image as the model sees it
    px = im.load()
    red = lambda p: p[0] > 200 and p[1] < 60 and p[2] < 60  # noqa: E731
    # the drawn outline runs along the object's edges (left, right, top, bottom) ...
    assert all(red(px[x, 112]) for x in (105, 314)) and all(red(px[210, y]) for y in (56, 167))
    # ... the object (blue) is inside it, the background (white) outside, and no red anywhere else
    assert px[210, 112][2] > 200 and px[210, 112][0] < 60
    assert all(min(px[x, y]) > 200 for x, y in ((50, 30), (400, 200), (100, 112), (320, 112)))
    stray = [(x, y) for x in range(im.size[0]) for y in range(im.size[1]) if red(px[x, y])
             and not (103 <= x <= 316 and 54 <= y <= 169)]
    assert not stray, stray[:5]
    # the same annotation under Qwen3-VL draws from its 0-1000 values onto its own resize
    out3 = ground / "seen3.png"
    r = _preview(ground, models["qwen3vl"], 100352, cli_env, "--draw", str(out3))
    im3 = Image.open(out3).convert("RGB")
    w, h = im3.size
    assert red(im3.load()[w // 4, h // 2]) or red(im3.load()[w // 4 + 1, h // 2])
    # an existing file is never overwritten: one line, exit 2
    before = out.read_bytes()
    r = _vlsft("datasets", "preview", "--config", str(_run_yaml(ground, models["qwen2.5vl"], 100352)),
               "--dataset", "g", "--draw", str(out), env=cli_env)
    assert r.returncode == 2 and "exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and out.read_bytes() == before


def _plant(folder: Path, name: str, records: list, bbox_format: str | None = None) -> None:
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = {"data_path": ".", "annotation_path": f"{name}.jsonl"}
    if bbox_format:
        entry["bbox_format"] = bbox_format
    (folder / f"{name}.json").write_text(json.dumps({name: entry}))


def _g(image, box, answer="<bbox>", key="bbox"):
    return {"image": image, "objects": [{"label": "cat", key: box}],
            "conversations": [{"from": "human", "value": "<image>\n<ref>?"}, {"from": "gpt", "value": answer}]}


def test_deep_check_flags_each_planted_problem_with_file_line(tmp_path, cli_env):
    _object_image(tmp_path / "big.png")
    Image.new("RGB", (200, 100)).save(tmp_path / "small.png")
    literal = {"image": "big.png", "conversations": [{"from": "human", "value": "<image>\nfind the cat"},
                                                     {"from": "gpt", "value": '{"bbox_2d": [480, 270, 1440, 810]}'}]}
    planted = [_g("big.png", BOX),                        # 1 clean
               _g("big.png", [480, 270, 2000, 810]),      # 2 outside the image
               _g("big.png", [0.1, 0.2, 0.5, 0.6]),        # 3 0-1 values declared pixel
               _g("small.png", [20, 200, 600, 900]),       # 4 0-1000 values on a 200x100 image
               _g("big.png", [1440, 270, 480, 810]),      # 5 x2 < x1
               _g("big.png", [480, 270, 480, 810]),       # 6 zero width
               literal]                                   # 7 answer box beyond the 896x504 Qwen2.5-VL image
    _plant(tmp_path, "planted", planted)
    r = _vlsft("datasets", "check", "--deep", "planted.json", env=cli_env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr  # the two errors are samples the trainer skips
    lines = r.stdout.splitlines()
    expect = {2: ("warning", "lies outside the 1920x1080 image"), 3: ("warning", '"bbox_format": "norm1"'),
              4: ("warning", '"bbox_format": "norm1000"'), 5: ("error", "x2 < x1"), 6: ("error", "zero width"),
              7: ("warning", "exceeds the 896x504 image Qwen2.5-VL sees")}
    for line, (severity, text) in expect.items():
        hits = [x for x in lines if f"planted.jsonl:{line}: {severity}:" in x]
        assert hits and text in hits[0] and "hint:" in hits[0], (line, r.stdout)
    assert not any("planted.jsonl:1:" in x for x in lines), r.stdout
    assert "grounding planted: 7 boxes, 6 rescaled for Qwen2.5-VL (default max_pixels), 4 suspicious" in r.stdout
    rep = json.loads(_vlsft("datasets", "check", "--deep", "--json", "planted.json", env=cli_env, cwd=tmp_path).stdout)
    assert rep["datasets"][0]["grounding"] == {"boxes": 7, "rescaled": 6, "suspicious": 4}
    # a declared convention that matches the data: nothing flagged; norm1 data declared norm1
    _plant(tmp_path, "clean", [_g("big.png", BOX), _g("small.png", [10, 10, 190, 90], "<objects>"),
                               _g("big.png", [960, 540], "<point>", "point"),
                               {**literal, "conversations": [literal["conversations"][0],
                                                             {"from": "gpt", "value": '{"bbox_2d": [10, 20, 400, 300]}'}]}])
    r = _vlsft("datasets", "check", "--deep", "clean.json", env=cli_env, cwd=tmp_path)
    assert r.returncode == 0 and "0 errors, 0 warnings" in r.stdout, r.stdout
    assert "grounding clean: 4 boxes, 3 rescaled for Qwen2.5-VL (default max_pixels), 0 suspicious" in r.stdout
    _plant(tmp_path, "n1", [_g("big.png", [0.25, 0.25, 0.75, 0.75])], bbox_format="norm1")
    r = _vlsft("datasets", "check", "--deep", "n1.json", env=cli_env, cwd=tmp_path)
    assert r.returncode == 0 and "0 errors, 0 warnings" in r.stdout, r.stdout
    # a wrong bbox_format value: one line with file:line:column and the choices
    (tmp_path / "bad.json").write_text('{"g": {"annotation_path": "n1.jsonl", "bbox_format": "pixels"}}')
    r = _vlsft("datasets", "check", "bad.json", env=cli_env, cwd=tmp_path)
    assert r.returncode == 1 and "bad.json:1:" in r.stdout and "pixel, norm1000, norm1" in r.stdout


def test_convert_keeps_objects_and_bbox_format(tmp_path, cli_env):
    """``datasets convert --to official`` of a messages dataset keeps the objects and the dictionary's bbox_format."""
    Image.new("RGB", (100, 100)).save(tmp_path / "a.png")
    rec = {"images": ["a.png"], "objects": [{"label": "c", "bbox": [0.1, 0.1, 0.5, 0.5]}],
           "messages": [{"role": "user", "content": "<image><ref>?"}, {"role": "assistant", "content": "<bbox>"}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({"m": {"data_path": ".", "annotation_path": "m.jsonl",
                                                       "bbox_format": "norm1"}}))
    r = _vlsft("datasets", "convert", "d.json", "--out", "conv", env=cli_env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads((tmp_path / "conv" / "m.jsonl").read_text().splitlines()[0])
    assert out["objects"] == rec["objects"] and out["conversations"][1]["value"] == "<bbox>"
    assert json.loads((tmp_path / "conv" / "Dataset-Dictionary.json").read_text())["m"]["bbox_format"] == "norm1"


def test_deep_check_of_a_messages_dataset_reads_its_objects(tmp_path, cli_env):
    """The grounding checks run on the internal record every format is normalised into."""
    _object_image(tmp_path / "big.png")
    msgs = [{"role": "user", "content": [{"type": "image", "image": "big.png"}, {"type": "text", "text": "<ref>?"}]},
            {"role": "assistant", "content": "<bbox>"}]
    recs = [{"objects": [{"label": "c", "bbox": [480, 270, 2000, 810]}], "messages": msgs},
            {"objects": [{"label": "c", "bbox": [900, 270, 480, 810]}], "messages": msgs}]
    _plant(tmp_path, "m", recs)
    r = _vlsft("datasets", "check", "--deep", "m.json", env=cli_env, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "m.jsonl:1: warning: [objects]" in r.stdout and "outside the 1920x1080 image" in r.stdout
    assert "m.jsonl:2: error: [objects]" in r.stdout and "x2 < x1" in r.stdout
    assert "grounding m: 2 boxes, 2 rescaled for Qwen2.5-VL (default max_pixels), 1 suspicious" in r.stdout


@pytest.mark.slow
def test_predict_renders_grounding_and_reports_iou(tmp_path, tiny_model_dir, cli_env):
    """``vlsft predict`` on a grounding dataset: the prompt and reference in the model's convention (tiny Qwen2.5-VL,
    its processor's limits: 1000x500 -> 1008x504), and IoU@0.5 / mean IoU of parsed boxes in original pixels."""
    Image.new("RGB", (1000, 500), (255, 255, 255)).save(tmp_path / "w.png")
    recs = [_g("w.png", [250, 125, 750, 375]), _g("w.png", [0, 0, 100, 100])]
    for r in recs:
        r["conversations"][0]["value"] = "<image>\nWhere is the <ref>?"
    _plant(tmp_path, "g", recs)
    out = tmp_path / "preds.jsonl"
    r = _vlsft("predict", str(tiny_model_dir), "--dataset", "g", "--dictionary", str(tmp_path / "g.json"),
               "--out", str(out), "--limit", "1", "--max-new-tokens", "2", env=cli_env)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[0])
    assert row["prompt"] == "Where is the cat?" and row["reference"] == "[252, 126, 756, 378]", row
    # scored rows (written here, so no generation runs): one exact box, one far off -> IoU@0.5 0.5, mean 0.5
    out2 = tmp_path / "scored.jsonl"
    out2.write_text("".join(json.dumps({"dataset": "g", "index": i, "where": f"g.jsonl:{i + 1}", "prompt": "",
                                        "prediction": p, "reference": ""}) + "\n"
                            for i, p in ((0, '{"bbox_2d": [252, 126, 756, 378], "label": "cat"}'),
                                         (1, "[800, 400, 1000, 500]"))))
    r = _vlsft("predict", str(tiny_model_dir), "--dataset", "g", "--dictionary", str(tmp_path / "g.json"),
               "--out", str(out2), "--resume", env=cli_env)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "scored.jsonl.metrics.json").read_text())
    assert metrics["boxes"] == 2 and metrics["iou@0.5"] == 0.5 and metrics["mean_iou"] == 0.5, metrics
    assert "iou@0.5 0.5" in r.stdout

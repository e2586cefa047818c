"""Data in other tools' formats trains as it is (issue "bring your data as it is"): one 2-rank `vlsft train` run
over a dictionary whose datasets are written in every supported format (official, messages with tags, messages
with part lists, OpenAI image_url parts, LLaMA-Factory sharegpt, ms-swift with system / loss:false / frame-list
video), and one over LLaMA-Factory's own dataset_info.json used as `data.dictionary`. Every sample of every
format must be trained (the summary counts them), none skipped. Round 2 adds a Hugging Face parquet dataset
(embedded image bytes, a text-only row with ``images: []``), base64 data: URL images, TRL prompt/completion
records, InternVL records (no ``<image>`` tag), ms-swift grounding objects and a video given as a folder of frames
to the same run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from plan_fixtures import write_run_yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
VLSFT = str(Path(sys.executable).with_name("vlsft"))
Q, A = "\nWhat colour is the shape?", "It is red."


def _records(img: str, frames: list[str]) -> dict[str, list[dict]]:
    return {
        "official": [{"image": img, "conversations": [{"from": "human", "value": "<image>" + Q},
                                                      {"from": "gpt", "value": A}]},
                     {"conversations": [{"from": "human", "value": "Two plus two?"}, {"from": "gpt", "value": "4"}]}],
        "tags": [{"messages": [{"role": "user", "content": "<image>" + Q}, {"role": "assistant", "content": A}],
                  "images": [img]},
                 {"messages": [{"role": "user", "content": "<video>\nWhat moves?"},
                               {"role": "assistant", "content": "A square."}], "videos": ["moving_square.mp4"]}],
        "parts": [{"messages": [{"role": "user", "content": [{"type": "image", "image": img},
                                                             {"type": "text", "text": Q}]},
                                {"role": "assistant", "content": [{"type": "text", "text": A}]}]}] * 2,
        "openai": [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                              {"type": "text", "text": Q}]},
                                 {"role": "assistant", "content": A}]}] * 2,
        "sharegpt": [{"conversations": [{"from": "human", "value": "<image>" + Q}, {"from": "gpt", "value": A}],
                      "images": [img]}] * 2,
        "swift": [{"system": "Be brief.", "messages": [{"role": "user", "content": "<image>" + Q},
                                                       {"role": "assistant", "content": "no", "loss": False},
                                                       {"role": "user", "content": "Again?"},
                                                       {"role": "assistant", "content": A}], "images": [img]},
                  {"messages": [{"role": "system", "content": "Count frames."},
                                {"role": "user", "content": "<video>\nWhat moves?"},
                                {"role": "assistant", "content": "A square."}], "videos": [frames]}],
    }


def _run_yaml(path: Path, model: Path, dictionary: Path, out: Path, port: int) -> Path:
    return write_run_yaml(
        path, model, out, model={"tune_mm_vision": None}, data={"dictionary": dictionary},
        training={"learning_rate": 1.0e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": None,
                  "num_train_epochs": 1, "bf16": None, "lr_scheduler_type": None, "save_steps": 100},
        distributed={"master_port": port, "deepspeed": "none"}, wandb=None)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("media")
    shutil.copy(DEMO / "images" / "red_square.png", d / "red.png")
    shutil.copy(DEMO / "videos" / "moving_square.mp4", d / "moving_square.mp4")
    frames = []
    for i, name in enumerate(("red_square.png", "green_square.png", "blue_square.png", "yellow_square.png")):
        shutil.copy(DEMO / "images" / name, d / f"frame{i}.png")
        frames.append(f"frame{i}.png")
    (d / "frames.json").write_text(json.dumps(frames))
    return d


def _train(cfg: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    return subprocess.run([VLSFT, "train", "--config", str(cfg)], env=env, capture_output=True, text=True,
                          timeout=480, cwd=REPO)


def _round2(folder: Path, media: Path, entries: dict) -> int:
    """A parquet file with an embedded PNG and a text-only row, a data: URL image, TRL prompt/completion records:
    their entries added to ``entries``; how many records."""
    import base64

    import pyarrow as pa
    import pyarrow.parquet as pq

    png = (media / "red.png").read_bytes()
    turns = [{"role": "user", "content": "<image>" + Q}, {"role": "assistant", "content": A}]
    rows = [{"messages": turns, "images": [{"bytes": png, "path": None}]},
            {"messages": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "4"}],
             "images": []}] * 2  # 24 records in all: each rank reads 12, none repeated to even them out
    features = {"messages": [{"role": {"dtype": "string", "_type": "Value"},
                              "content": {"dtype": "string", "_type": "Value"}}],
                "images": {"feature": {"_type": "Image"}, "_type": "Sequence"}}
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, folder / "hf.parquet")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    more = {"dataurl": [{"messages": turns, "images": [url]}] * 2,
            "trl": [{"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]}],
                     "completion": [{"role": "assistant", "content": A}], "images": ["red.png"]}] * 2}
    frames = folder / "clip_0001"  # a video as a folder of frames (LLaVA-Video)
    frames.mkdir()
    for i, colour in enumerate(("red", "green", "blue", "yellow")):
        shutil.copy(DEMO / "images" / f"{colour}_square.png", frames / f"frame_{i + 1}.png")
    more["internvl"] = [{"id": 0, "image": "red.png", "conversations": [{"from": "human", "value": Q.strip()},
                                                                         {"from": "gpt", "value": A}]}] * 2
    more["grounding"] = [{"messages": [{"role": "user", "content": "<image>Find <ref-object>."},
                                       {"role": "assistant", "content": "<bbox>"}], "images": ["red.png"],
                          "objects": {"ref": ["the square"], "bbox": [[4, 4, 24, 24]], "bbox_type": "real"}}]
    more["frames"] = [{"video": str(frames), "fps": 1, "conversations": [
        {"from": "human", "value": "<video>\nWhat changes?"}, {"from": "gpt", "value": "The colour."}]}]
    entries["parquet"] = {"annotation_path": "hf.parquet"}
    for name, records in more.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        entries[name] = {"data_path": str(media), "annotation_path": f"{name}.jsonl",
                         **({"format": "internvl"} if name == "internvl" else {})}
    return len(rows) + sum(len(r) for r in more.values())


def test_every_format_trains_in_one_two_rank_run(tmp_path, media, tiny_model_dir):
    frames = json.loads((media / "frames.json").read_text())
    entries = {}
    total = 0
    for name, records in _records("red.png", frames).items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        entries[name] = {"data_path": str(media), "annotation_path": f"{name}.jsonl"}
        total += len(records)
    total += _round2(tmp_path, media, entries)
    (tmp_path / "d.json").write_text(json.dumps(entries, indent=2))
    check = subprocess.run([VLSFT, "datasets", "check", str(tmp_path / "d.json"), "--deep"], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    for fmt in ("official", "messages", "sharegpt", "prompt_completion"):
        assert fmt in check.stdout
    p = _train(_run_yaml(tmp_path / "run.yaml", tiny_model_dir, tmp_path / "d.json", tmp_path / "out", 29741))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert f"# samples: {total} trained, 0 skipped as bad, {total} read on 2 rank(s)" in p.stdout, p.stdout[-2000:]
    assert "# done" in p.stdout


def test_llamafactory_dataset_info_trains_as_the_dictionary(tmp_path, media, tiny_model_dir):
    lf = tmp_path / "lf"
    shutil.copytree(media, lf / "mllm_demo_data")
    demo = [{"messages": [{"role": "user", "content": "<image>" + Q}, {"role": "assistant", "content": A}],
             "images": ["mllm_demo_data/red.png"]},
            {"messages": [{"role": "user", "content": "<video>\nWhat moves?"},
                          {"role": "assistant", "content": "A square."}],
             "videos": ["mllm_demo_data/moving_square.mp4"]},
            {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A model."}]},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>" + Q},
                          {"role": "assistant", "content": A}], "images": ["mllm_demo_data/frame1.png"]}]
    (lf / "mllm_demo.json").write_text(json.dumps(demo, indent=2))
    info = {"mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "images": "images", "videos": "videos"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}}}
    (lf / "dataset_info.json").write_text(json.dumps(info, indent=2))
    p = _train(_run_yaml(tmp_path / "run.yaml", tiny_model_dir, lf / "dataset_info.json", tmp_path / "out", 29743))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "# samples: 4 trained, 0 skipped as bad, 4 read on 2 rank(s)" in p.stdout, p.stdout[-2000:]

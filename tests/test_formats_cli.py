"""Annotation formats through the real CLI (issue 12): preview parity, datasets check with and without --deep,
LLaMA-Factory's dataset_info.json as the dictionary, datasets convert."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_inprocess import vlsft as vlsft_in_process
from PIL import Image

Q, A = "\nWhat colour is it?", "Green."
RECORDS = {
    "official": {"image": "a.png", "conversations": [{"from": "human", "value": "<image>" + Q},
                                                     {"from": "gpt", "value": A}]},
    "tags": {"messages": [{"role": "user", "content": "<image>" + Q}, {"role": "assistant", "content": A}],
             "images": ["a.png"]},
    "parts": {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                        {"type": "text", "text": Q}]},
                           {"role": "assistant", "content": [{"type": "text", "text": A}]}]},
    "openai": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                         {"type": "text", "text": Q}]},
                            {"role": "assistant", "content": A}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "<image>" + Q}, {"from": "gpt", "value": A}],
                 "images": ["a.png"]},
}
SWIFT = {"system": "Be brief.", "messages": [{"role": "user", "content": "<image>" + Q},
                                              {"role": "assistant", "content": "no", "loss": False},
                                              {"role": "user", "content": "Again?"},
                                              {"role": "assistant", "content": A}], "images": ["a.png"]}
KEYS = ("input_ids", "labels", "position_ids", "image_grid_thw", "video_grid_thw", "pixel_values",
        "pixel_values_videos")


def vlsft(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlsft", *args], capture_output=True, text=True, timeout=180,
                          env=env)


@pytest.fixture()
def data(tmp_path) -> Path:
    (tmp_path / "media").mkdir()
    Image.new("RGB", (56, 84), (10, 200, 30)).save(tmp_path / "media/a.png")
    entries = {}
    for name, rec in {**RECORDS, "swift": SWIFT}.items():
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(rec) + "\n")
        entries[name] = {"data_path": "media", "annotation_path": f"{name}.jsonl"}
    (tmp_path / "d.json").write_text(json.dumps(entries))
    return tmp_path


def _preview(model: Path, dictionary: Path, name: str, env) -> dict:
    """The preview JSON of sample 0 (in process: cli_inprocess; the subprocess form is test_preview_cli's)."""
    r = vlsft_in_process("datasets", "preview", "--model", str(model), "--dictionary", str(dictionary), "--dataset",
                         name, "--index", "0", "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_preview_is_identical_in_every_format(data, qwen_tokenizer_dir, cli_env):
    ref = _preview(qwen_tokenizer_dir, data / "d.json", "official", cli_env)
    assert ref["format"] == "official" and ref["image_grid_thw"] == [[1, 10, 8]]
    for name in ("tags", "parts", "openai", "sharegpt"):
        got = _preview(qwen_tokenizer_dir, data / "d.json", name, cli_env)
        assert got["format"] == ("sharegpt" if name == "sharegpt" else "messages")
        assert {k: got[k] for k in KEYS} == {k: ref[k] for k in KEYS}, name
        assert got["conversation"] == ref["conversation"]
    swift = _preview(qwen_tokenizer_dir, data / "d.json", "swift", cli_env)
    assert [(t["role"], t["content"], t["trained"]) for t in swift["conversation"]] == [
        ("system", "Be brief.", False), ("user", "<image>" + Q, False), ("assistant", "no", False),
        ("user", "Again?", False), ("assistant", A, True)]
    assert swift["image_grid_thw"] == ref["image_grid_thw"] and swift["pixel_values"] == ref["pixel_values"]


def test_check_reports_formats_and_refuses_unread_media_without_deep(data):
    r = vlsft("datasets", "check", str(data / "d.json"), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {d["name"]: d for d in json.loads(r.stdout)["datasets"]}
    assert {n: (d["format"], d["images"], d["text_only"]) for n, d in rows.items()} == {
        "official": ("official", 1, 0), "tags": ("messages", 1, 0), "parts": ("messages", 1, 0),
        "openai": ("messages", 1, 0), "sharegpt": ("sharegpt", 1, 0), "swift": ("messages", 1, 0)}
    # before issue 12 these said OK and counted every sample text-only
    (data / "forced.json").write_text(json.dumps({
        "forced": {"data_path": "media", "annotation_path": "sharegpt.jsonl", "format": "official"},
        "alpaca": {"annotation_path": "alpaca.jsonl"},
        "paths": {"data_path": "media", "annotation_path": "paths.jsonl"}}))
    (data / "alpaca.jsonl").write_text(json.dumps({"instruction": "q", "input": "", "output": "a"}) + "\n")
    (data / "paths.jsonl").write_text(json.dumps({**RECORDS["tags"], "image_path": "a.png"}) + "\n")
    r = vlsft("datasets", "check", str(data / "forced.json"))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    errors = [line for line in r.stdout.splitlines() if ": error: " in line]
    assert len(errors) == 3, errors
    assert "dataset 'forced': key 'images' holds media the official format does not read: 1 of the first samples " \
           "would train without it (first at sharegpt.jsonl:1) (hint: the official format reads 'image' / " \
           "'video': rename 'images' to 'image')" in errors[0]
    assert "dataset 'alpaca': unknown annotation format: alpaca (instruction/input/output) records" in errors[1]
    assert "(first at alpaca.jsonl:1); vlsft reads official (conversations + image/video)" in errors[1]
    assert "dataset 'paths': key 'image_path' holds media the messages format does not read" in errors[2]
    cells = {line.split("│")[0].strip(): [c.strip() for c in line.split("│")] for line in r.stdout.splitlines()
             if "│" in line}
    assert (cells["forced"][1], cells["alpaca"][1], cells["paths"][1]) == ("official", "?", "messages")


def test_deep_check_every_format_with_lines(data):
    (data / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in [
        RECORDS["tags"],
        {"messages": [{"role": "user", "content": "<image><image>"}, {"role": "assistant", "content": "a"}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "loss": "no"}]},
        {"messages": [{"role": "user", "content": "<video>"}, {"role": "assistant", "content": "a"}],
         "videos": [["a.png", "gone.png"]]},
        {"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]) + "\n")
    (data / "bad.json").write_text(json.dumps({"bad": {"data_path": "media", "annotation_path": "bad.jsonl"}}))
    r = vlsft("datasets", "check", str(data / "bad.json"), "--deep")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    f = data / "bad.jsonl"
    for want in (f"{f}:2: error: [images] 2 <image> tag(s) for 1 image(s)",
                 f"{f}:3: error: [loss] 'loss' must be true, false or null, found a string 'no'",
                 f"{f}:4: error: [image/video] media file not found: {data / 'media/gone.png'}",
                 f"{f}:5: error: [role] unknown role 'bot'"):
        assert want in r.stdout, (want, r.stdout)
    assert f"{f}:1:" not in r.stdout


def test_llamafactory_dataset_info_is_a_dictionary(data, qwen_tokenizer_dir, cli_env):
    """LLaMA-Factory's own layout (dataset_info.json next to the data, mllm_demo-style entry): nothing changed."""
    lf = data / "lf"
    (lf / "mllm_demo_data").mkdir(parents=True)
    Image.new("RGB", (56, 84), (10, 200, 30)).save(lf / "mllm_demo_data/1.jpg")
    demo = [{**RECORDS["tags"], "images": ["mllm_demo_data/1.jpg"]}]
    (lf / "mllm_demo.json").write_text(json.dumps(demo, indent=2))
    (lf / "sg.json").write_text(json.dumps([{**RECORDS["sharegpt"], "images": ["mllm_demo_data/1.jpg"],
                                             "sys": "Be brief."}]))
    info = {"mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                          "columns": {"messages": "messages", "images": "images"},
                          "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                   "assistant_tag": "assistant"}},
            "sg": {"file_name": "sg.json", "formatting": "sharegpt",
                   "columns": {"messages": "conversations", "images": "images", "system": "sys"}}}
    (lf / "dataset_info.json").write_text(json.dumps(info, indent=2))
    r = vlsft("datasets", "check", str(lf / "dataset_info.json"), "--deep")
    assert r.returncode == 0 and "OK deep check: 2 datasets (none with errors)" in r.stdout, r.stdout + r.stderr
    assert [c.strip() for c in next(x for x in r.stdout.splitlines() if x.startswith("mllm_demo")).split("│")][1] \
        == "sharegpt"
    ref = _preview(qwen_tokenizer_dir, data / "d.json", "official", cli_env)
    got = _preview(qwen_tokenizer_dir, lf / "dataset_info.json", "mllm_demo", cli_env)
    assert {k: got[k] for k in KEYS} == {k: ref[k] for k in KEYS}
    sg = _preview(qwen_tokenizer_dir, lf / "dataset_info.json", "sg", cli_env)
    assert sg["conversation"][0]["content"] == "Be brief."  # the declared system column
    # what vlsft does not read: one line each
    (lf / "dataset_info.json").write_text(json.dumps({
        "hub": {"hf_hub_url": "llamafactory/demo"}, "alp": {"file_name": "mllm_demo.json"},
        "noimg": {"file_name": "mllm_demo.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}}}))
    r = vlsft("datasets", "check", str(lf / "dataset_info.json"))
    errors = [line for line in r.stdout.splitlines() if ": error: " in line]
    assert r.returncode == 1 and len(errors) == 3, r.stdout
    assert "dataset 'hub': hf_hub_url llamafactory/demo is not in the Hugging Face cache" in errors[0]  # not here
    assert "dataset 'alp' uses LLaMA-Factory's 'alpaca' formatting, which vlsft does not read" in errors[1]
    assert "dataset 'noimg': key 'images' holds media the sharegpt format does not read" in errors[2]


def test_convert_to_official(data, qwen_tokenizer_dir, cli_env):
    out = data / "converted"
    r = vlsft("datasets", "convert", str(data / "d.json"), "--to", "official", "--out", str(out))
    # the swift sample has a 'loss': false turn, which the official format cannot say: left out, listed
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{data / 'swift.jsonl'}:1: warning: left out: a turn is masked ('loss': false" in r.stderr
    assert "tags: messages -> official, 1 sample(s) written" in r.stdout
    conv = json.loads((out / "Dataset-Dictionary.json").read_text())
    assert json.loads((out / "tags.jsonl").read_text()) == {**RECORDS["official"], "image": ["a.png"]}
    r = vlsft("datasets", "check", str(out / "Dataset-Dictionary.json"), "--deep")
    assert r.returncode == 0 and "OK deep check" in r.stdout, r.stdout
    ref = _preview(qwen_tokenizer_dir, data / "d.json", "parts", cli_env)
    got = _preview(qwen_tokenizer_dir, out / "Dataset-Dictionary.json", "parts", cli_env)
    assert got["format"] == "official" and {k: got[k] for k in KEYS} == {k: ref[k] for k in KEYS}
    assert conv["swift"]["length"] == 0
    # nothing existing is overwritten
    r = vlsft("datasets", "convert", str(data / "d.json"), "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "not an empty folder" in r.stderr

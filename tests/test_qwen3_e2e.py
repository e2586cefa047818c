"""The current Qwen generations end to end (2 CPU ranks, real torchrun):

* Qwen3-VL MoE: `vlsft train` on images + a video + text-only samples with ZeRO-2 (as the official sft_30a3b.sh),
  reloaded with plain transformers (no missing / unexpected key) and generating; ZeRO-3 refused in one line at the
  front door and by the standalone trainer (transformers 5.24 transposes fused experts into ZeRO-3 partitions).
* Qwen3.5 (dense and MoE): `vlsft train` with padded batches under ZeRO-3, reloaded and generating; flatten /
  packing refused in one line before anything is launched.
* The official HEAD README's launch example, pasted with local paths, through `python -m qwenvl.train`.
* print-args names the model family (from config.json, torch-free) and what it cannot do here.
One run per family (module fixtures), 2-3 optimizer steps each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"
CACHE = REPO / ".cache"
PORTS = {"qwen3_vl_moe": 29461, "qwen3_5": 29462, "qwen3_5_moe": 29463}
BATCHING = {"qwen3_vl_moe": "padded", "qwen3_5": "packing", "qwen3_5_moe": "flatten"}


def tiny(family: str) -> Path:
    from qwenvl.tiny import ensure_tiny_model

    return ensure_tiny_model(CACHE / f"tiny-{family}", family=family)


def write_yaml(path: Path, model: Path, out: Path, *, port: int, deepspeed: str, steps: int = 3,
               dictionary: Path = DICT, use: str = "shapes, clips, facts", batching: str = "padded") -> Path:
    path.write_text(f"""
model:
  name_or_path: {model}
  tune_mm_mlp: true
  tune_mm_llm: true
  attn_implementation: sdpa
data:
  dictionary: {dictionary}
  use: [{use}]
  max_pixels: 12544
  min_pixels: 3136
  video_fps: 2
  video_max_pixels: 50176
  video_min_pixels: 784
  model_max_length: 1024
  packing: {str(batching == "packing").lower()}
  flatten: {str(batching == "flatten").lower()}
training:
  learning_rate: 5.0e-3
  per_device_train_batch_size: 2
  max_steps: {steps}
  save_steps: 100
  logging_steps: 1
  lr_scheduler_type: constant
  report_to: none
distributed:
  nproc_per_node: 2
  master_port: {port}
  deepspeed: {deepspeed}
output:
  dir: {out}
wandb:
  mode: disabled
""")
    return path


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
    e.update(WANDB_MODE="disabled", VLSFT_SAMPLE_LOG="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VLSFT_TEST_CRASH_RANK"):
        e.pop(k, None)
    return e


def vlsft(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, *args], env=env(), capture_output=True, text=True, timeout=timeout, cwd=REPO)


def one_error_line(p: subprocess.CompletedProcess) -> str:
    lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stdout[-1500:] + p.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module", params=["qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"])
def family_run(request, tmp_path_factory):
    """One short 2-rank `vlsft train` per family on image + video + text data: Qwen3-VL MoE padded with ZeRO-2
    (ZeRO-3 is refused for it); Qwen3.5 packed and Qwen3.5 MoE flattened (the Gated DeltaNet layers keep the
    samples of a row apart: qwenvl.linear_attention), with ZeRO-3."""
    family = request.param
    model = tiny(family)
    d = tmp_path_factory.mktemp(f"e2e-{family}")
    out = d / "out"
    cfg = write_yaml(d / "run.yaml", model, out, port=PORTS[family],
                     deepspeed="zero2" if family == "qwen3_vl_moe" else "zero3", batching=BATCHING[family])
    p = vlsft("train", "--config", str(cfg))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"family": family, "model": model, "out": out, "cfg": cfg, "proc": p}


def test_trains_mixed_data_on_two_ranks_reloads_and_generates(family_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qwenvl.families import family as family_record

    out, family, p = family_run["out"], family_run["family"], family_run["proc"]
    logs = [json.loads(x) for r in (0, 1) for x in (out / "logs" / f"samples-rank{r}.jsonl").read_text().splitlines()]
    assert {x["world_size"] for x in logs} == {2}
    assert sum(x["videos"] for x in logs) >= 1 and sum(x["images"] for x in logs) >= 1, logs
    assert "# samples: 12 trained, 0 skipped as bad, 12 read on 2 rank(s)" in p.stdout.splitlines(), p.stdout[-2000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    text = p.stdout + p.stderr
    if BATCHING[family] != "padded":  # the rows really held several samples, kept apart per Gated DeltaNet layer
        assert "Gated DeltaNet layers keep packed samples apart" in text, text[-3000:]
        assert "linear attention: a packed batch," in text, text[-3000:]
    # the saved keys are those of the base model's file: plain transformers loads every weight, none new
    base = load_file(str(family_run["model"] / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert set(base) <= set(saved) <= set(base) | {"lm_head.weight"}  # (a tied lm_head may be written too)
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert type(model).__name__ == family_record(family).model_class
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    changed = {k for k in base if not torch.equal(base[k].float(), saved[k].float())}
    assert any("visual.merger" in k for k in changed) and any(".layers." in k and "visual" not in k for k in changed)
    assert not any("visual.blocks" in k for k in changed)  # tune_mm_vision false
    if family.endswith("moe"):
        assert any(".mlp.experts" in k for k in changed)
    proc = AutoProcessor.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What shape is it?"}]}]
    ids = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_tensors="pt",
                                   return_dict=True)
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]


def test_moe_zero3_refused_in_one_line_at_the_front_door(tmp_path):
    model = tiny("qwen3_vl_moe")
    cfg = write_yaml(tmp_path / "run.yaml", model, tmp_path / "out", port=29464, deepspeed="zero3")
    for cmd in ("print-args", "train"):
        line = one_error_line(vlsft(cmd, "--config", str(cfg)))
        assert line.startswith(f"{cfg}:") and "[distributed.deepspeed]" in line, line
        assert "qwen3_vl_moe cannot be trained with DeepSpeed ZeRO-3" in line and "zero2" in line, line
    assert not (tmp_path / "out").exists()  # nothing launched, nothing written
    assert vlsft("print-args", "--config", str(cfg), "distributed.deepspeed=zero2").returncode == 0
    # the standalone trainer applies the same rule before the model loads
    p = subprocess.run([sys.executable, "-m", "qwenvl.train", "--model_name_or_path", str(model), "--dataset_dict",
                        str(DICT), "--dataset_use", "facts", "--output_dir", str(tmp_path / "o2"), "--deepspeed",
                        "zero3", "--tune_mm_llm", "True", "--report_to", "none"], env=env(), capture_output=True,
                       text=True, timeout=300, cwd=REPO)
    err = [x for x in p.stderr.splitlines() if x.startswith("error")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(err) == 1 and "qwen3_vl_moe cannot be trained with DeepSpeed ZeRO-3" in err[0], p.stderr[-3000:]


def test_family_rules_are_torch_free_and_read_the_zero_stage(tmp_path):
    from qwenvl.families import family
    from qwenvl.prechecks import family_problems, zero_stage

    assert (zero_stage(REPO / "configs" / "zero3.json"), zero_stage(str(REPO / "configs" / "zero2.json"))) == (3, 2)
    assert zero_stage('{"zero_optimization": {"stage": 3}}') == 3 and zero_stage(tmp_path / "missing.json") is None
    assert family("qwen3_vl_moe").deepspeed_problem(3) and family("qwen3_vl_moe").deepspeed_problem(2) is None
    assert family("qwen3_5_moe").deepspeed_problem(3) is None and family("qwen3_vl").deepspeed_problem(3) is None
    found = family_problems("qwen3_vl_moe", data_flatten=True, data_packing=True, zero_stage=3)
    assert [k for k, _, _ in found] == ["distributed.deepspeed"] and found[0][2].startswith("use ZeRO-2")
    assert family("qwen2_5_vl").limits() == [] and family("qwen3_vl").limits() == []


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen35_packing_and_flatten_planned(tmp_path, family):
    """No refusal at the front door any more: print-args plans packed and flattened Qwen3.5 runs."""
    cfg = write_yaml(tmp_path / "run.yaml", tiny(family), tmp_path / "out", port=29465, deepspeed="zero3")
    for key in ("data.packing", "data.flatten"):
        p = vlsft("print-args", "--config", str(cfg), f"{key}=true")
        assert p.returncode == 0 and f"--{'data_packing' if key == 'data.packing' else 'data_flatten'} True" in \
            p.stdout.replace("\\\n", " "), p.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_print_args_names_the_family_and_its_limits(tmp_path):
    rows = {}
    for family, ds in (("qwen3_5", "zero3"), ("qwen3_vl_moe", "zero2"), ("qwen3_vl", "zero3")):
        cfg = write_yaml(tmp_path / f"{family}.yaml", tiny(family), tmp_path / "out", port=29466, deepspeed=ds)
        p = vlsft("print-args", "--config", str(cfg))
        assert p.returncode == 0, p.stderr
        rows[family] = [x for x in p.stdout.splitlines() if x.startswith("# Model family")]
    assert rows["qwen3_5"] and "qwen3_5" in rows["qwen3_5"][0] and "cannot here" not in rows["qwen3_5"][0]
    assert "no ZeRO-3" in rows["qwen3_vl_moe"][0]
    assert rows["qwen3_vl"] == ["# Model family: Qwen3-VL (config.json model_type qwen3_vl; samples built as the "
                                "official HEAD layout, boxes json-1000)"]
    # per dataset: the official pre-packed bins of tests/golden/official-qwen3vl-head, for a family that cannot pack
    golden = REPO / "tests" / "golden" / "official-qwen3vl-head"
    d = tmp_path / "dict.json"
    d.write_text(json.dumps({"packed": {"data_path": str(golden / "media"),
                                        "annotation_path": str(golden / "annotations" / "public_packed.json")},
                             "facts": {"data_path": str(DICT.parent), "annotation_path": str(DICT.parent / "facts.jsonl")}}))
    for family, noted in (("qwen3_5", False), ("qwen3_vl", False)):  # every shipped family packs
        cfg = write_yaml(tmp_path / f"p-{family}.yaml", tiny(family), tmp_path / "out", port=29466, deepspeed="zero3",
                         dictionary=d, use="packed, facts")
        text = vlsft("print-args", "--config", str(cfg)).stdout.splitlines()
        i = next(i for i, x in enumerate(text) if x.startswith("#   packed"))
        assert ("pre-packed bins read as single samples" in text[i + 1]) == noted, text
        assert not noted or "qwen3_5 cannot pack" in text[i + 1]
        assert sum("note:" in x for x in text) == noted  # facts (text only, JSONL) gets none


README_EXAMPLE = """
    --deepspeed {ds} --model_name_or_path {model} --dataset_use shapes,clips,facts
    --data_flatten True --data_packing True --tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True
    --bf16 --output_dir {out} --num_train_epochs 3 --per_device_train_batch_size 4 --per_device_eval_batch_size 8
    --gradient_accumulation_steps 4 --max_pixels 50176 --min_pixels 784
    --video_fps 2 --video_max_frames 8 --video_min_frames 4 --video_max_pixels 1304576 --video_min_pixels 200704
    --eval_strategy no --save_strategy steps --save_steps 500 --save_total_limit 3
    --learning_rate 2e-7 --mm_projector_lr 1e-5 --vision_tower_lr 1e-6 --optim adamw_torch
    --model_max_length 4096 --weight_decay 0.01 --warmup_ratio 0.03 --lr_scheduler_type cosine --logging_steps 1
    --gradient_checkpointing True --dataloader_num_workers 4 --run_name qwen2vl-baseline --report_to wandb
"""


def test_official_head_readme_launch_example_runs(tmp_path):
    """The HEAD README's `args=...` block (README of qwen-vl-finetune; values as recorded in
    reference/official-finetune.md, `$((1664*28*28))` etc. evaluated), with local paths for the model, the
    DeepSpeed JSON and the data (our dataset dictionary replaces the hard-coded registry), launched as the README
    does with torchrun; `--max_steps 1` is appended to keep it short (it would run 3 epochs). W&B runs offline."""
    model = tiny("qwen3_vl")
    out = tmp_path / "out"
    args = README_EXAMPLE.format(ds=REPO / "configs" / "zero3.json", model=model, out=out).split()
    args += ["--dataset_dict", str(DICT), "--max_steps", "1"]
    e = {**env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           "--master_port=29467", "-m", "qwenvl.train", *args]
    p = subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    text = p.stdout + p.stderr
    assert "optimizer group merger           lr 1e-05" in text and "optimizer group llm              lr 2e-07" in text
    logs = [json.loads(x) for r in (0, 1) for x in (out / "logs" / f"samples-rank{r}.jsonl").read_text().splitlines()]
    assert {x["world_size"] for x in logs} == {2} and sum(x["videos"] for x in logs) >= 1
    assert (out / "model.safetensors").exists() and (out / "chat_template.jinja").exists()


def test_preview_shows_frames_timestamps_and_vision_tokens_per_video_for_qwen3_vl():
    model = tiny("qwen3_vl")
    args = ("datasets", "preview", "--model", str(model), "--dictionary", str(DICT), "--dataset", "clips",
            "--index", "0")
    from cli_inprocess import vlsft as in_process  # the same command; torch and the processor imported once

    p = in_process(*args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    doc = json.loads(in_process(*args, "--json").stdout)
    frames, stamps, g = doc["frame_idx"][0], doc["video_timestamps"][0], doc["video_grid_thw"][0]
    assert len(stamps) == g[0] == len(frames) // 2 and stamps == sorted(stamps)  # one timestamp per temporal patch
    line = next(x for x in p.stdout.splitlines() if x.startswith("video 0:"))
    assert f"{len(frames)} frames" in line and f"{g[0] * g[1] * g[2] // 4} vision tokens" in line, line
    assert "timestamps <" in line and line.count(" seconds>") == g[0], line
    assert doc["second_per_grid_ts"] is None  # the HEAD layout passes no second_per_grid_ts

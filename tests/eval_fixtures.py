"""One trained run shared by the eval, chat/predict tests: `vlsft train` -> 2 ranks, ZeRO-3, packing, CPU.

Data (written into a temporary folder; images are the demo's):
* ``mem``   - 16 text records with one and the same answer (memorised within a few steps),
* ``noise`` - 16 text records whose answers are seeded random words (cannot be memorised),
* ``shapes`` - the demo's 8 image records,
* ``facts`` - the demo's 6 text records, evaluation only (``data.eval``).
``data.eval_split: 0.25`` holds out a quarter of mem / noise / shapes. 6 steps of 2 x 3 samples (one epoch of the
30 training records, then one more step), logging every step, eval every 3.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
DEMO = REPO / "configs" / "demo"
WORDS = ("amber basil cedar delta ember fjord gravel harbor iris juniper kelp lumen maple nectar onyx pepper quartz "
         "raven sage tundra umber velvet willow xenon yarrow zephyr").split()
MEM_ANSWER = "The secret phrase is violet seven lantern."


def write_data(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    with open(d / "mem.jsonl", "w") as f:
        for _ in range(16):
            f.write(json.dumps({"conversations": [{"from": "human", "value": "Tell me the secret phrase."},
                                                  {"from": "gpt", "value": MEM_ANSWER}]}) + "\n")
    with open(d / "noise.jsonl", "w") as f:
        for i in range(16):
            answer = " ".join(rng.choice(WORDS) for _ in range(10))
            f.write(json.dumps({"conversations": [{"from": "human", "value": f"Say something random ({i})."},
                                                  {"from": "gpt", "value": answer}]}) + "\n")
    dictionary = {
        "mem": {"data_path": str(d), "annotation_path": str(d / "mem.jsonl")},
        "noise": {"data_path": str(d), "annotation_path": str(d / "noise.jsonl")},
        "shapes": {"data_path": str(DEMO / "images"), "annotation_path": str(DEMO / "shapes.json")},
        "facts": {"data_path": str(DEMO), "annotation_path": str(DEMO / "facts.jsonl")},
    }
    path = d / "Dataset-Dictionary.json"
    path.write_text(json.dumps(dictionary, indent=1))
    return path


def write_yaml(path: Path, model: Path, dictionary: Path, out: Path, *, steps: int, port: int) -> Path:
    path.write_text(f"""
model:
  name_or_path: {model}
  tune_mm_vision: false
  tune_mm_mlp: true
  tune_mm_llm: true
  attn_implementation: sdpa
data:
  dictionary: {dictionary}
  use: [mem, noise, shapes]
  eval: [facts]
  eval_split: 0.25
  max_pixels: 12544
  min_pixels: 3136
  model_max_length: 256
  packing: true
training:
  learning_rate: 1.0e-2
  per_device_train_batch_size: 3
  per_device_eval_batch_size: 4
  gradient_accumulation_steps: 1
  max_steps: {steps}
  bf16: true
  save_steps: 6
  logging_steps: 1
  eval_steps: 3
  lr_scheduler_type: constant
  report_to: none
distributed:
  nproc_per_node: 2
  master_port: {port}
  deepspeed: zero3
output:
  dir: {out}
  run_name: eval
  resume: auto
wandb:
  mode: disabled
""")
    return path


def cli_env() -> dict:
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["WANDB_MODE"] = "disabled"
    e["VLSFT_SAMPLE_LOG"] = "1"
    e.pop("VLSFT_TEST_CRASH_RANK", None)
    return e


def train(cfg: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([VLSFT, "train", "--config", str(cfg), *extra], env=cli_env(), capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def make_trained_run(root: Path, tiny_model_dir: Path) -> dict:
    dictionary = write_data(root / "data")
    out = root / "out"
    cfg = write_yaml(root / "run.yaml", tiny_model_dir, dictionary, out, steps=6, port=29671)
    t0 = time.time()
    p = train(cfg)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"root": root, "out": out, "cfg": cfg, "dictionary": dictionary, "proc": p, "seconds": time.time() - t0}

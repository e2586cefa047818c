"""One trained run shared by the eval, chat/predict tests: `vlsft train` -> 2 ranks, ZeRO-3, packing, CPU.

Data (written into a temporary folder; images are the demo's):
* ``mem``   - 16 text records with one and the same answer (memorised within a few steps),
* ``noise`` - 16 text records whose answers are seeded random words (cannot be memorised),
* ``shapes`` - the demo's 8 image records,
* ``facts`` - the demo's 6 text records, evaluation only (``data.eval``).
``data.eval_split: 0.25`` holds out a quarter of mem / noise / shapes. 6 steps of 2 x 3 samples (one epoch of the
30 training records, then one more step), logging every step, eval every 3. Eval batches of 3: the 16 eval samples on
2 ranks make 18 with the 2 the distributed sampler repeats, which must count once (``eval_samples`` 16).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from plan_fixtures import write_run_yaml
from runs import VLSFT, train  # noqa: F401  (VLSFT: imported from here by test_eval)

REPO = Path(__file__).resolve().parents[1]
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
    return write_run_yaml(
        path, model, out,
        data={"dictionary": dictionary, "use": ["mem", "noise", "shapes"], "eval": ["facts"], "eval_split": 0.25,
              "video_max_frames": None, "video_min_frames": None, "video_max_frame_pixels": None,
              "video_min_frame_pixels": None, "model_max_length": 256, "packing": True},
        training={"learning_rate": 1.0e-2, "per_device_train_batch_size": 3, "per_device_eval_batch_size": 3,
                  "max_steps": steps, "save_steps": 6, "eval_steps": 3},
        distributed={"master_port": port}, output={"run_name": "eval", "resume": "auto"})


def make_trained_run(root: Path, tiny_model_dir: Path) -> dict:
    dictionary = write_data(root / "data")
    out = root / "out"
    cfg = write_yaml(root / "run.yaml", tiny_model_dir, dictionary, out, steps=6, port=29671)
    t0 = time.time()
    p = train(cfg, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"root": root, "out": out, "cfg": cfg, "dictionary": dictionary, "proc": p, "seconds": time.time() - t0}

"""Small on-disk projects for the plan / print-args tests: a dataset dictionary, annotations and a run YAML."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

RUN_YAML = """\
# vlsft test run
model:
  name_or_path: model
  tune_mm_mlp: true
  tune_mm_llm: true
data:
  dictionary: data/dict.json
  max_pixels: 100352
training:
  learning_rate: 2e-5
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 4
distributed:
  nproc_per_node: 8
  nnodes: 2
  master_addr: 10.1.2.3
  deepspeed: none
output:
  dir: runs/first
"""


def _sample(kind: str | None, i: int) -> dict:
    human = {"from": "human", "value": f"question {i}"}
    sample: dict = {"conversations": [human, {"from": "gpt", "value": f"answer {i}"}]}
    if kind:
        sample[kind] = f"{kind}{i}.{'jpg' if kind == 'image' else 'mp4'}"
        human["value"] = f"<{kind}>\n" + human["value"]
    return sample


def make_project(root: Path, sizes: dict[str, tuple[int, str | None]] | None = None,
                 rates: dict[str, dict] | None = None, run_yaml: str = RUN_YAML) -> Path:
    """Write ``root/run.yaml``, ``root/model/`` and ``root/data/{dict.json, *.jsonl}``; return the YAML path.

    ``sizes``: name -> (records, media kind or None); ``rates``: name -> extra dictionary keys.
    """
    sizes = sizes or {"docs": (1000, "image"), "charts": (300, "image")}
    rates = rates if rates is not None else {"docs": {"sampling_rate": 0.5}, "charts": {"repeat_time": 2.5}}
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (root / "model").mkdir(exist_ok=True)
    (root / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')  # the front door reads the family
    (data / "media").mkdir(exist_ok=True)
    entries = {}
    for name, (count, kind) in sizes.items():
        with open(data / f"{name}.jsonl", "w") as f:
            for i in range(count):
                f.write(json.dumps(_sample(kind, i)) + "\n")
        entries[name] = {"data_path": "media", "annotation_path": f"{name}.jsonl", "length": count,
                         **rates.get(name, {})}
    (data / "dict.json").write_text(json.dumps(entries, indent=2))
    path = root / "run.yaml"
    path.write_text(textwrap.dedent(run_yaml))
    return path


# ---- run YAMLs for the suite's real training runs ----------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
DEMO_DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"

# What the suite's short CPU runs share: the tiny Qwen2.5-VL's demo data at small pixel budgets, 2 ranks, ZeRO-3.
TINY_RUN: dict = {
    "model": {"name_or_path": None, "tune_mm_vision": False, "tune_mm_mlp": True, "tune_mm_llm": True,
              "attn_implementation": "sdpa"},
    "data": {"dictionary": str(DEMO_DICT), "max_pixels": 12544, "min_pixels": 3136, "video_max_frames": 4,
             "video_min_frames": 2, "video_max_frame_pixels": 3136, "video_min_frame_pixels": 3136,
             "model_max_length": 512},
    "training": {"learning_rate": 5.0e-3, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
                 "bf16": True, "logging_steps": 1, "lr_scheduler_type": "constant", "report_to": "none"},
    "distributed": {"nproc_per_node": 2, "deepspeed": "zero3"},
    "output": {"dir": None},
    "wandb": {"mode": "disabled"},
}


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = str(value) if isinstance(value, Path) else value
    return out


def write_run_yaml(path: Path, model: Path | str, out: Path, /, **sections: dict | None) -> Path:
    """Write a run YAML for a real `vlsft train`: :data:`TINY_RUN` with ``model.name_or_path`` and ``output.dir``
    set, each keyword a section whose keys replace the defaults (``None`` drops a key, or a whole section)."""
    import yaml

    changes: dict = {"model": {"name_or_path": str(model)}, "output": {"dir": str(out)}}
    for name, section in sections.items():
        changes[name] = None if section is None else {**changes.get(name, {}), **section}
    run = _merged(TINY_RUN, changes)
    path.write_text("# vlsft test run\n" + yaml.safe_dump(run, sort_keys=False))
    return path

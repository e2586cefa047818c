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

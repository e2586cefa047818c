"""No run that lies (issue 9 item 3), through the real `vlsft train` -> torchrun -> 2 CPU ranks, tiny model.

* every sample bad (and max_bad_sample_ratio 1, so only the no-sample check can catch it): exit 2, one
  `error:` line, no "# done", no final model;
* 15 % bad in a 20-sample set with max_bad_sample_ratio 0.01: stopped (before the old rule's 100 samples per
  rank) with the by-kind line, exit 2, no final model, the skipped samples listed with their file:line;
* a clean run (the suite's shared ``e2e_run``) prints the summary line with the trained count summed over both
  ranks.
The statistical rule itself is unit-tested in tests/test_batch_stats.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from plan_fixtures import write_run_yaml
from runs import train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "configs" / "demo" / "images"


def _records(n: int, bad: dict[int, str]) -> list[dict]:
    out = []
    for i in range(n):
        image, answer = "red_square.png", f"red {i}"
        if bad.get(i) == "missing_media":
            image = f"missing_{i}.png"
        elif bad.get(i) == "too_long":
            answer = "a very long answer " * 150  # over model_max_length 256
        out.append({"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                      {"from": "gpt", "value": answer}]})
    return out


def _run(tmp_path: Path, model: Path, records: list[dict], *, port: int, ratio: float, steps: int = 0,
         batch: int = 2) -> tuple[subprocess.CompletedProcess, Path]:
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in records))
    d = tmp_path / "dict.json"
    d.write_text(json.dumps({"mix": {"data_path": str(IMAGES), "annotation_path": str(ann)}}))
    out = tmp_path / "out"
    length = {"max_steps": steps} if steps else {"num_train_epochs": 1}
    cfg = write_run_yaml(
        tmp_path / "run.yaml", model, out, model={"tune_mm_llm": False, "attn_implementation": None},
        data={"dictionary": d, "max_pixels": 3136, "min_pixels": 3136, "video_max_frames": None,
              "video_min_frames": None, "video_max_frame_pixels": None, "video_min_frame_pixels": None,
              "model_max_length": 256, "max_bad_sample_ratio": ratio},
        training={"learning_rate": None, "gradient_accumulation_steps": None, "bf16": None, "lr_scheduler_type": None,
                  "per_device_train_batch_size": batch, **length, "save_steps": 1000},
        distributed={"master_port": port, "deepspeed": "none"}, output={"resume": "never"})
    return train(cfg, timeout=300), out


def _errors(p: subprocess.CompletedProcess) -> list[str]:
    return [ln[ln.index("error:"):] for ln in (p.stdout + p.stderr).splitlines() if "error:" in ln]


def _final_model(out: Path) -> list[str]:
    return [f.name for f in out.glob("model*.safetensors")] + [f.name for f in out.glob("trainer_state.json")]


def test_every_sample_bad_is_an_error_not_a_done_run(tmp_path, tiny_model_dir):
    p, out = _run(tmp_path, tiny_model_dir, _records(8, {i: "missing_media" for i in range(8)}), port=29691,
                  ratio=1.0, steps=2)
    text = p.stdout + p.stderr
    assert p.returncode == 2, text[-4000:]
    assert "Traceback" not in text and "# done" not in p.stdout
    errors = _errors(p)
    assert errors == [f"error: no sample was trained: all 8 samples read were bad (8 missing_media); see "
                      f"{out / 'logs'}/skipped-samples-rank*.jsonl; no final model was written; fix the data "
                      "(vlsft datasets check --deep)"], errors
    assert _final_model(out) == []
    logged = [json.loads(x) for r in (0, 1) for x in (out / "logs" / f"skipped-samples-rank{r}.jsonl")
              .read_text().splitlines()]
    assert len(logged) == 8 and {x["kind"] for x in logged} == {"missing_media"}
    assert {x["rank"] for x in logged} == {0, 1} and all(re.search(r"ann\.jsonl:\d+$", x["where"]) for x in logged)


def test_fifteen_percent_bad_in_a_tiny_set_stops_with_counts_by_kind(tmp_path, tiny_model_dir):
    bad = {3: "missing_media", 9: "too_long", 16: "missing_media"}  # 3 of 20 = 15 %
    p, out = _run(tmp_path, tiny_model_dir, _records(20, bad), port=29693, ratio=0.01)
    text = p.stdout + p.stderr
    assert p.returncode == 2, text[-4000:]
    assert "Traceback" not in text and "# done" not in p.stdout
    errors = _errors(p)
    assert len(errors) == 1, errors
    m = re.fullmatch(r"error: stopped: (\d+) of (\d+) samples bad \([\d.]+%, at 99% confidence at least [\d.]+% > "
                     r"max_bad_sample_ratio 0\.01\): (.+); see (\S+); fix the data \(vlsft datasets check --deep\) "
                     r"or raise max_bad_sample_ratio", errors[0])
    assert m, errors[0]
    n_bad, n_read = int(m.group(1)), int(m.group(2))
    kinds = dict((k, int(n)) for n, k in (part.split(" ") for part in m.group(3).split(", ")))
    assert 2 <= n_bad <= 3 and n_read <= 20 and sum(kinds.values()) == n_bad
    assert set(kinds) <= {"missing_media", "too_long"}
    assert m.group(4) == f"{out / 'logs'}/skipped-samples-rank*.jsonl"
    assert _final_model(out) == []


def test_clean_run_summary_counts_trained_samples_over_ranks(e2e_run):
    """On the suite's shared clean run (conftest ``e2e_run``: 2 ranks, 8 steps, batch 1, nothing bad)."""
    p, out = e2e_run["proc"], e2e_run["out"]
    # 8 steps x 2 ranks x batch 1 = 16 samples
    assert "# samples: 16 trained, 0 skipped as bad, 16 read on 2 rank(s)" in p.stdout.splitlines(), p.stdout[-3000:]
    assert "# done" in p.stdout and "model.safetensors" in _final_model(out)

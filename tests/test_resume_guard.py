"""A resume never lies about the run it continues (audit 2: D1, D2, D3), through the real `vlsft train`.

* D1: a run that trained no sample (every sample bad, max_bad_sample_ratio 1) saves no checkpoint, so its rerun
  cannot resume it and say "done"; a checkpoint records the samples trained over the whole run
  (``vlsft-run.json``);
* D2: a checkpoint resumed with other settings (here tune_mm_vision) is refused in one line before loading (its
  ``vlsft-run.json``), and a checkpoint without that record (an older vlsft) fails to load in one line, not a
  traceback per rank;
* D3: a changed learning rate on resume is named in one warning (the checkpoint's base lr continues), and the
  optimizer-group log line does not claim the new value.
The record helpers themselves are unit-tested at the top.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from plan_fixtures import write_run_yaml
from runs import train

from qwenvl import runpolicy

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "configs" / "demo" / "images"


# ---- the record helpers (fast)
def test_settings_mismatch_names_what_changed():
    rec = {"model_type": "qwen2_5_vl", "trained_in_full": ["merger", "llm"], "lora": None}
    assert runpolicy.settings_mismatch("ck", rec, dict(rec)) is None
    assert runpolicy.settings_mismatch("ck", None, rec) is None  # an older checkpoint: nothing to compare
    line = runpolicy.settings_mismatch("ck", rec, {**rec, "trained_in_full": ["vision", "merger", "llm"],
                                                   "lora": {"r": 8, "targets": ["llm"]}})
    assert "\n" not in line and line.startswith("cannot resume ck: it was written with ")
    assert "parts trained in full (tune_mm_*) [merger, llm] (this run: [vision, merger, llm])" in line
    assert "LoRA none (this run: r 8 targets [llm])" in line and "output.resume=never" in line
    # a key this run does not know yet is not compared
    assert runpolicy.settings_mismatch("ck", {**rec, "trainable": {"llm": 5}}, rec) is None


def test_schedule_changes_and_record_round_trip(tmp_path):
    runpolicy.write_run_record(tmp_path, {"trained_samples": 0, "schedule": {"learning_rate": 0.005}})
    rec = runpolicy.read_run_record(tmp_path)
    assert rec["trained_samples"] == 0
    assert runpolicy.schedule_changes(rec["schedule"], {"learning_rate": 0.05}) == [("learning_rate", 0.005, 0.05)]
    assert runpolicy.schedule_changes(rec["schedule"], {"learning_rate": 0.005}) == []
    assert runpolicy.read_run_record(tmp_path / "none") is None


# ---- real runs (slow): 2 CPU ranks, no DeepSpeed, a few steps
def _records(n: int, bad: bool) -> list[dict]:
    return [{"image": f"missing_{i}.png" if bad else "red_square.png",
             "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                               {"from": "gpt", "value": f"red {i}"}]} for i in range(n)]


def _run(tmp_path: Path, model: Path, out: Path, *, port: int, bad: bool = False, steps: int = 2,
         ratio: float = 0.5, model_extra: dict | None = None, training: dict | None = None,
         resume: str = "auto") -> subprocess.CompletedProcess:
    ann = tmp_path / "ann.jsonl"
    ann.write_text("".join(json.dumps(r) + "\n" for r in _records(8, bad)))
    d = tmp_path / "dict.json"
    d.write_text(json.dumps({"mix": {"data_path": str(IMAGES), "annotation_path": str(ann)}}))
    cfg = write_run_yaml(
        tmp_path / f"run-{port}.yaml", model, out,
        model={"tune_mm_llm": False, "attn_implementation": None, **(model_extra or {})},
        data={"dictionary": d, "max_pixels": 3136, "min_pixels": 3136, "video_max_frames": None,
              "video_min_frames": None, "video_max_frame_pixels": None, "video_min_frame_pixels": None,
              "model_max_length": 256, "max_bad_sample_ratio": ratio},
        training={"gradient_accumulation_steps": None, "bf16": None, "per_device_train_batch_size": 1,
                  "max_steps": steps, "save_steps": 2, **(training or {})},
        distributed={"master_port": port, "deepspeed": "none"}, output={"resume": resume})
    return train(cfg, timeout=300)


def _errors(p: subprocess.CompletedProcess) -> list[str]:
    return [ln[ln.index("error:"):] for ln in (p.stdout + p.stderr).splitlines() if "error:" in ln]


@pytest.mark.slow
def test_a_run_that_trained_nothing_is_never_resumed_as_done(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    for attempt in range(2):  # the first run, then the same command again (resume auto)
        p = _run(tmp_path, tiny_model_dir, out, port=29741, bad=True, ratio=1.0)
        text = p.stdout + p.stderr
        assert p.returncode == 2, text[-4000:]
        assert "Traceback" not in text and "# done" not in p.stdout, (attempt, text[-4000:])
        errors = _errors(p)
        assert len(errors) == 1 and errors[0].startswith("error: no sample was trained"), errors
        assert not list(out.glob("checkpoint-*")), (attempt, sorted(x.name for x in out.iterdir()))
        assert not list(out.glob("model*.safetensors"))


@pytest.mark.slow
def test_resume_with_other_settings_or_lr_is_one_line(tmp_path, tiny_model_dir):
    base = tmp_path / "base"
    p = _run(tmp_path, tiny_model_dir, base, port=29743)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    ck = base / "checkpoint-2"
    rec = runpolicy.read_run_record(ck)
    assert rec["trained_samples"] == 4 and rec["settings"]["trained_in_full"] == ["merger"], rec
    assert rec["settings"]["model_type"] == "qwen2_5_vl" and rec["settings"]["lora"] is None
    assert rec["schedule"]["learning_rate"] == 5.0e-3

    def copy(name: str, keep_record: bool = True) -> Path:
        out = tmp_path / name
        out.mkdir()
        shutil.copytree(ck, out / "checkpoint-2")
        if not keep_record:
            (out / "checkpoint-2" / runpolicy.RUN_RECORD).unlink()
        return out

    # D2: other trainable parts, refused before loading, from the record
    out = copy("vision")
    p = _run(tmp_path, tiny_model_dir, out, port=29745, steps=3, model_extra={"tune_mm_vision": True})
    text = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in text, text[-4000:]
    assert _errors(p) == [f"error: cannot resume {out / 'checkpoint-2'}: it was written with parts trained in "
                          "full (tune_mm_*) [merger] (this run: [vision, merger]); resume with the same settings, "
                          "or start a new run (a new output.dir, or output.resume=never with "
                          "output.overwrite=true)"], _errors(p)

    # D2: a checkpoint of an older vlsft (no record): the load failure is one line
    out = copy("old", keep_record=False)
    p = _run(tmp_path, tiny_model_dir, out, port=29747, steps=3, model_extra={"tune_mm_vision": True})
    text = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in text, text[-4000:]
    errors = _errors(p)
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot resume {out / 'checkpoint-2'}: its weights or "
                                                     "optimizer state do not fit this run's model"), errors

    # D3: another learning rate: one warning, the group line does not claim it, the record keeps the old lr
    out = copy("lr")
    p = _run(tmp_path, tiny_model_dir, out, port=29749, steps=3, training={"learning_rate": 0.05})
    text = p.stdout + p.stderr
    assert p.returncode == 0 and "# done" in p.stdout, text[-4000:]
    warned = [ln for ln in text.splitlines() if "learning_rate 0.05 (checkpoint: 0.005) not applied" in ln]
    assert len(warned) == 1, text[-4000:]
    groups = [ln for ln in text.splitlines() if "optimizer group" in ln]
    assert groups and all("lr 0.05" not in ln and "configured 0.05, applied to a fresh run only" in ln
                          for ln in groups), groups
    lrs = [h["learning_rate"] for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
           if "learning_rate" in h]
    assert lrs and all(abs(x - 0.005) < 1e-9 for x in lrs), lrs

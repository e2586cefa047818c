"""``vlsft predict RUN --dataset NAME`` with the run's saved dictionary (``<run>/vlsft/Dataset-Dictionary.json``,
written by ``vlsft train``'s :func:`~vlsft.cmd_train.save_run_files`): its relative paths resolve as the
original dictionary's did (the folder ``data.dictionary`` of the run's ``run.yaml`` names), not against
``<run>/vlsft/`` (Trust, round 3). A project moved whole (dictionary and run together) still predicts; annotations
that are gone are one ``error:`` line, exit 2, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo"
VLSFT = str(Path(sys.executable).with_name("vlsft"))


def _project(root: Path, model: Path) -> Path:
    """The demo's dictionary (relative paths) in ``root/data``, a run YAML naming it relatively, and the run folder
    ``root/runs/demo`` as ``vlsft train`` leaves it: the run files it saves, and a model."""
    from vlsft.cmd_train import save_run_files
    from vlsft.plan import plan_from_file

    data = root / "data"
    data.mkdir(parents=True)
    for name in ("Dataset-Dictionary.json", "facts.jsonl", "shapes.json", "clips.json"):
        shutil.copy(DEMO / name, data / name)
    shutil.copytree(DEMO / "images", data / "images")
    shutil.copytree(DEMO / "videos", data / "videos")
    cfg = root / "run.yaml"
    cfg.write_text(f"model: {{name_or_path: {model}, tune_mm_llm: true}}\n"
                   "data: {dictionary: data/Dataset-Dictionary.json, use: [shapes], max_pixels: 12544, min_pixels: 3136}\n"
                   "output: {dir: runs/demo}\n")
    plan = plan_from_file(cfg, environ={})
    run = root / "runs" / "demo"
    save_run_files(plan, run, str(cfg), [])
    assert json.loads((run / "vlsft" / "Dataset-Dictionary.json").read_text())["shapes"]["data_path"] == "images"
    for f in model.iterdir():  # the run's final model (links: the tiny model is a few MB)
        (run / f.name).symlink_to(f)
    return run


def _predict(run: Path, out: Path, cwd: Path, monkeypatch=None) -> subprocess.CompletedProcess:
    """``vlsft predict`` from ``cwd``: in process when ``monkeypatch`` is given (the model imports paid once per
    session), else a real subprocess (exit status and stderr of the process itself)."""
    args = ["predict", str(run), "--dataset", "shapes", "--out", str(out), "--limit", "2", "--max-new-tokens", "2"]
    if monkeypatch is not None:
        from cli_inprocess import vlsft

        monkeypatch.chdir(cwd)
        monkeypatch.setenv("WANDB_MODE", "disabled")
        return vlsft(*args)
    return subprocess.run([VLSFT, "predict", str(run), "--dataset", "shapes", "--out", str(out), "--limit", "2",
                           "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, "WANDB_MODE": "disabled"})


def test_predict_resolves_the_saved_dictionary_as_the_original(tmp_path, tiny_model_dir, monkeypatch):
    run = _project(tmp_path / "proj", tiny_model_dir)
    p = _predict(run, tmp_path / "p.jsonl", cwd=REPO, monkeypatch=monkeypatch)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert rows[0]["where"] == f"{tmp_path / 'proj' / 'data' / 'shapes.json'}[0]"

    # the project moved whole (dictionary, data and run together): the copy follows the original's new place
    shutil.move(tmp_path / "proj", tmp_path / "moved")
    p = _predict(tmp_path / "moved" / "runs" / "demo", tmp_path / "q.jsonl", cwd=tmp_path, monkeypatch=monkeypatch)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["where"] == f"{tmp_path / 'moved' / 'data' / 'shapes.json'}[0]"

    # the annotations are gone: one line naming what and how to fix, exit 2
    (tmp_path / "moved" / "data" / "shapes.json").unlink()
    p = _predict(tmp_path / "moved" / "runs" / "demo", tmp_path / "r.jsonl", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot read the annotations of dataset 'shapes' at ")
    assert "--dictionary" in lines[0] and not (tmp_path / "r.jsonl").exists()

"""The suite's shared training runs: each is trained once per session, on first use, by a session fixture in
conftest.py (``e2e_run``, ``lora_run``, ``trained_run``), and every test that needs "a trained run folder" reads
it instead of training its own.

A test never writes into a shared run's folder: one that resumes a run, or adds files to it, works on a copy
(:func:`copy_run`), so the tests stay independent of their order.

* ``e2e_run``: `vlsft train` -> torchrun -> 2 CPU ranks, DeepSpeed ZeRO-3, full fine-tuning of the tiny Qwen2.5-VL,
  8 steps over the bundled demo data (images, a video, text-only samples), checkpoints at 4 and 8;
* ``lora_run``: the same launch with LoRA on the language model + a fully trained merger, 6 steps, checkpoints
  at 3 and 6;
* ``trained_run``: the eval / chat / predict run of ``eval_fixtures`` (packing, held-out split, eval data).

Under pytest-xdist (``make test`` runs two workers) each worker is a session of its own: :func:`shared_run` makes
the first worker that needs a run train it, under a file lock in the folder the workers share, and the others read
what it recorded, so each run is still trained once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from plan_fixtures import write_run_yaml

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))
CACHE = REPO / ".cache"


def cli_env(**extra: str) -> dict:
    """The environment of a real `vlsft train` in the suite: no W&B, per-rank sample logs, no crash hook."""
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(CACHE / "torch_extensions"))
    e["WANDB_MODE"] = "disabled"
    e["VLSFT_SAMPLE_LOG"] = "1"
    for k in ("VLSFT_TEST_CRASH_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    e.update(extra)
    return e


def train(cfg: Path, *overrides: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`vlsft train --config CFG OVERRIDES...`, its output captured."""
    return subprocess.run([VLSFT, "train", "--config", str(cfg), *overrides], env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _trained(root: Path, cfg: Path, out: Path) -> dict:
    t0 = time.time()
    p = train(cfg)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return {"dir": root, "out": out, "cfg": cfg, "proc": p, "seconds": time.time() - t0}


def shared_run(tmp_path_factory, name: str, make) -> dict:
    """``make(root)``'s run, trained once for all the session's workers (the module docstring)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder above every worker's own
    root = base / f"shared-{name}"
    record = base / f"shared-{name}.json"
    with FileLock(str(record) + ".lock"):
        if record.exists():
            return _loaded(json.loads(record.read_text(encoding="utf-8")))
        root.mkdir()
        try:
            run = make(root)
        except BaseException as e:  # the other workers fail with the same message instead of training again
            record.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}), encoding="utf-8")
            raise
        record.write_text(json.dumps(_saved(run)), encoding="utf-8")
        return run


def _saved(run: dict) -> dict:
    out = {}
    for k, v in run.items():
        if isinstance(v, Path):
            v = {"path": str(v)}
        elif isinstance(v, subprocess.CompletedProcess):
            v = {"proc": [v.args, v.returncode, v.stdout, v.stderr]}
        out[k] = v
    return out


def _loaded(saved: dict) -> dict:
    import pytest

    if "error" in saved:
        pytest.fail(f"the shared run failed in another worker: {saved['error'][:3000]}")
    out = {}
    for k, v in saved.items():
        if isinstance(v, dict) and "path" in v:
            v = Path(v["path"])
        elif isinstance(v, dict) and "proc" in v:
            v = subprocess.CompletedProcess(*v["proc"])
        out[k] = v
    return out


def make_e2e_run(root: Path, model: Path) -> dict:
    out = root / "out"
    cfg = write_run_yaml(root / "run.yaml", model, out, training={"max_steps": 8, "save_steps": 4},
                         distributed={"master_port": 29641}, output={"run_name": "e2e", "resume": "auto"})
    return _trained(root, cfg, out)


def make_lora_run(root: Path, model: Path) -> dict:
    out = root / "out"
    cfg = lora_yaml(root / "run.yaml", model, out, steps=6, port=29681)
    return _trained(root, cfg, out)


def lora_yaml(path: Path, model: Path, out: Path, *, steps: int, port: int, deepspeed: str = "zero3",
              data: dict | None = None, training: dict | None = None) -> Path:
    """The LoRA runs' YAML: adapters (r 16) on the language model, the merger trained in full, ZeRO-3 by default."""
    return write_run_yaml(
        path, model, out,
        model={"tune_mm_vision": None, "tune_mm_llm": None, "lora": {"enabled": True, "r": 16, "alpha": 32,
                                                                     "targets": ["llm"]}},
        data=data or {},
        training={"learning_rate": 5.0e-2, "gradient_accumulation_steps": None, "max_steps": steps, "save_steps": 3,
                  **(training or {})},
        distributed={"master_port": port, "deepspeed": deepspeed})


def copy_run(run: dict, dest: Path) -> Path:
    """A copy of a shared run's output folder under ``dest`` (for a test that resumes it or writes into it)."""
    out = dest / "out"
    shutil.copytree(run["out"], out, symlinks=True)
    return out

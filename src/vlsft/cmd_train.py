"""``vlsft train``: build the launch plan of a run YAML, show it, save it, and run it.

    vlsft train --config configs/demo.yaml
    vlsft train --config run.yaml training.learning_rate=1e-5 output.run_name=lr1e-5
    vlsft train --config run.yaml distributed.nnodes=2 distributed.node_rank=1 distributed.master_addr=10.0.0.1

Steps:

1. Load the YAML (+ ``KEY=VALUE`` overrides). Under SLURM, ``distributed.nnodes`` / ``node_rank`` /
   ``master_addr`` not set in the YAML come from ``SLURM_NNODES`` / ``SLURM_NODEID`` / the first host of
   ``SLURM_JOB_NODELIST``. With ``model.build_tiny: true`` a missing model folder is filled with a tiny
   random Qwen2.5-VL first (demo).
2. Build the same plan as ``vlsft print-args`` and print it (secrets masked).
3. Refuse a fresh run into an ``output.dir`` that already holds checkpoints or a model (one line, exit 2,
   nothing deleted) unless ``output.resume`` finds a checkpoint to continue or ``output.overwrite`` is true.
4. On node rank 0, save in ``<output.dir>/vlsft/``: ``run.yaml`` (resolved, no secrets), a copy of the
   dataset dictionary, ``dataset_use.txt`` and ``launch.sh`` (the command, secrets masked).
5. Run torchrun as a child process (argv list, plan environment on top of ours); Ctrl-C / SIGTERM are
   forwarded to it; exit with its status (a dead rank makes torchrun, and so this, exit non-zero).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer

from vlsft.app import app
from vlsft.cmd_plan import OVERRIDES_HELP


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", err=True, fg="red")
    raise typer.Exit(code)


def apply_slurm(cfg, environ) -> list[str]:
    """Fill distributed.* from SLURM_* where the YAML/overrides did not set them (see vlsft.plan.apply_slurm)."""
    from vlsft.plan import apply_slurm as _apply

    return _apply(cfg, environ)


def save_run_files(plan, out_dir: Path, config_path: str, overrides: list[str]) -> Path:
    """Write run.yaml / dataset dictionary copy / dataset_use.txt / launch.sh into ``<out_dir>/vlsft``."""
    from qwenvl import storage

    d = out_dir / "vlsft"
    d.mkdir(parents=True, exist_ok=True)
    (d / "run.yaml").write_text(plan.config.to_saveable_yaml(), encoding="utf-8")
    dictionary = plan.config.data.dictionary
    from vlsft.plan import storage_environment

    try:
        with storage_environment(plan.config, os.environ):  # the run's storage.* (endpoint may be only in the YAML)
            (d / "Dataset-Dictionary.json").write_bytes(storage.read_bytes(dictionary))
    except Exception as exc:  # noqa: BLE001 - a copy for the record; the plan already read it once
        typer.secho(f"warning: could not copy the dataset dictionary {dictionary}: {exc}", err=True, fg="yellow")
    (d / "dataset_use.txt").write_text(plan.dataset_use + "\n", encoding="utf-8")
    env = plan.display_env()
    lines = ["#!/usr/bin/env bash",
             f"# made by: {shlex.join(['vlsft', 'train', '--config', config_path, *overrides])}",
             "# secrets are masked (***): export them yourself before re-running this file"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(shlex.join(plan.torchrun))
    (d / "launch.sh").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def build_tiny_if_asked(cfg) -> None:
    m = cfg.model
    if not m.build_tiny:
        return
    path = Path(m.name_or_path)
    if not path.is_absolute():
        path = cfg.base_dir / path
    if (path / "config.json").exists():
        return
    typer.secho(f"model.build_tiny: building a tiny random Qwen2.5-VL in {path} (first run only, no download)",
                err=True)
    from qwenvl.tiny import ensure_tiny_model

    ensure_tiny_model(path)


@app.command("train")
def train(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False),
    config: Path = typer.Option(..., "--config", "-c", help="Run YAML (start from configs/demo.yaml or "
                                "configs/qwen2.5-vl-7b.yaml).", dir_okay=False),
) -> None:
    """Train: print the launch plan of a run YAML, save it in the output dir, run torchrun, return its status."""
    from qwenvl.problems import ProblemsError
    from vlsft.cmd_plan import render_text
    from vlsft.config import load_run_config
    from vlsft.launch import run_child
    from vlsft.plan import build_plan

    overrides = list(overrides or [])
    environ = dict(os.environ)
    try:
        cfg = load_run_config(config, overrides)
        try:
            build_tiny_if_asked(cfg)
        except OSError as exc:
            _fail(f"model.build_tiny: cannot build the tiny model in {cfg.model.name_or_path}: {exc.strerror or exc}")
        plan = build_plan(cfg, environ)
    except ProblemsError as exc:
        for problem in exc.problems:
            typer.secho(problem.render(), err=True, fg="red" if problem.is_error else "yellow")
        raise typer.Exit(2) from None

    typer.echo(render_text(plan, str(config), overrides))
    for warning in plan.warnings:
        typer.secho(f"warning: {warning}", fg="yellow")

    out = plan.config.output
    if "://" in out.dir:
        _fail(f"output.dir {out.dir} must be a local or shared-filesystem folder, not a URL")
    from qwenvl.train import UserError, decide_resume

    try:
        resume_from = decide_resume(out.dir, out.resume, out.overwrite)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"# resume: continuing from {resume_from}" if resume_from else "# resume: fresh start")

    if plan.config.distributed.node_rank == 0:
        try:
            saved = save_run_files(plan, Path(out.dir), str(config), overrides)
        except OSError as exc:
            _fail(f"cannot write the run files into output.dir {out.dir}: {exc.strerror or exc} (check the path and "
                  "its permissions)")
        typer.echo(f"# run files saved in {saved}")

    env = dict(os.environ)
    env.update(plan.env)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
    env.setdefault("PYTHONUNBUFFERED", "1")
    if plan.env.get("WANDB_MODE", "disabled") != "disabled":
        env.setdefault("WANDB_DIR", out.dir)  # wandb/ next to the checkpoints, not in the current folder
        if out.run_name:
            env.setdefault("WANDB_NAME", out.run_name)
    sys.stdout.flush()
    try:
        rc = run_child(plan.torchrun, env)
    except OSError as exc:  # torchrun missing or not executable
        _fail(f"cannot start {plan.torchrun[0]}: {exc.strerror or exc} (install torch in this environment: "
              "pip install -r requirements.txt)")
    if rc != 0:
        typer.secho(f"error: training exited with status {rc}", err=True, fg="red")
    else:
        typer.echo(f"# done: model, tokenizer, processor and chat template in {out.dir}")
    raise typer.Exit(rc)

"""``vlsft train``: build the launch plan of a run YAML, show it, save it, and run it.

    vlsft train --config configs/demo.yaml
    vlsft train --config run.yaml training.learning_rate=1e-5 output.run_name=lr1e-5
    vlsft train --config run.yaml distributed.nnodes=2 distributed.node_rank=1 distributed.master_addr=10.0.0.1

Steps:

1. Load the YAML (+ ``KEY=VALUE`` overrides). Under SLURM, ``distributed.nnodes`` / ``node_rank`` /
   ``master_addr`` not set in the YAML come from ``SLURM_NNODES`` / ``SLURM_NODEID`` / the first host of
   ``SLURM_JOB_NODELIST``. With ``model.build_tiny: true`` a missing model folder is filled with a tiny
   random Qwen2.5-VL first (demo).
2. Build the same plan as ``vlsft print-args`` and print it (secrets masked). A hub id in ``model.name_or_path``
   is first downloaded into this node's Hugging Face cache (:func:`fetch_hub_model`; ``HF_HUB_OFFLINE``: the cache
   only) and the plan is built again from the snapshot folder, which the ranks get.
3. On node rank 0, take the output lock ``<output.dir>/vlsft/lock`` (one writer per output folder; a second
   run is refused in one line naming the holder; a lock left by a dead process on this host is taken over
   with a warning). It is held until torchrun has ended.
4. Refuse a fresh run into an ``output.dir`` that already holds checkpoints or a model (one line, exit 2,
   nothing deleted) unless ``output.resume`` finds a complete checkpoint to continue or ``output.overwrite``
   is true (:mod:`qwenvl.runpolicy`).
5. On node rank 0, save in ``<output.dir>/vlsft/``: ``run.yaml`` (resolved, no secrets), a copy of the
   dataset dictionary, ``dataset_use.txt`` and ``launch.sh`` (the command, secrets masked).
6. Run torchrun as a child process (argv list, plan environment on top of ours; :mod:`vlsft.launch`): Ctrl-C,
   SIGTERM and SIGHUP are forwarded (the ranks save a checkpoint and stop), and torchrun dies with us even on
   ``kill -9``. torchrun's full stderr goes to ``<output.dir>/vlsft/torchrun.log``; the terminal shows the
   failing rank's own ``error:`` line without torchrun's traceback. Exit status: 0, 2 when a rank stopped on
   an input error, 130 / 143 / 129 for SIGINT / SIGTERM / SIGHUP, the failing rank's status otherwise.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import typer

from vlsft.app import app
from vlsft.cmd_plan import OVERRIDES_HELP


def _fail(message, code: int = 2) -> None:
    from vlsft.render import fail

    fail(message, code=code)


def apply_slurm(cfg, environ) -> list[str]:
    """Fill distributed.* from SLURM_* where the YAML/overrides did not set them (see vlsft.plan.apply_slurm)."""
    from vlsft.plan import apply_slurm as _apply

    return _apply(cfg, environ)


def save_run_files(plan, out_dir: Path, config_path: str, overrides: list[str]) -> Path:
    """Write run.yaml / dataset dictionary copy / dataset_use.txt / launch.sh into ``<out_dir>/vlsft``."""
    from qwenvl import storage
    from qwenvl.safe_write import atomic_file
    from qwenvl.secrets import mask_urls

    def write(name: str, data: str | bytes) -> None:  # temp + rename; a link there (a user's file) is refused
        with atomic_file(d / name, f"run file {d / name}", mode="wb" if isinstance(data, bytes) else "w",
                         exclusive=False) as fh:
            fh.write(data)

    d = out_dir / "vlsft"
    d.mkdir(parents=True, exist_ok=True)
    _keep_earlier_record(d)
    write("run.yaml", saved_config(plan).to_saveable_yaml())
    dictionary = plan.config.data.dictionary
    from vlsft.plan import storage_environment

    try:
        with storage_environment(plan.config, os.environ):  # the run's storage.* (endpoint may be only in the YAML)
            copy = storage.read_bytes(dictionary)
    except Exception as exc:  # noqa: BLE001 - a copy for the record; the plan already read it once
        copy = None
        typer.secho(f"warning: could not copy the dataset dictionary {dictionary}: {exc}", err=True, fg="yellow")
    if copy is not None:
        write("Dataset-Dictionary.json", copy)
    write("dataset_use.txt", plan.dataset_use + "\n")
    env = plan.display_env()
    lines = ["#!/usr/bin/env bash",
             mask_urls(f"# made by: {shlex.join(['vlsft', 'train', '--config', config_path, *overrides])}"),
             "# secrets are masked (***): export them yourself before re-running this file"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(shlex.join(plan.torchrun))
    write("launch.sh", "\n".join(lines) + "\n")
    return d


RECORD_FILES = ("run.yaml", "launch.sh", "dataset_use.txt", "Dataset-Dictionary.json")


def _keep_earlier_record(d: Path) -> None:
    """A resume or an overwrite launches again into the same folder: the earlier launch's record moves to
    ``vlsft/launches/<its time>/`` instead of being written over (``run.yaml`` then always says what the newest
    launch ran, and the history says what every earlier one did)."""
    import time

    earlier = [d / f for f in RECORD_FILES if (d / f).is_file() and not (d / f).is_symlink()]
    if not earlier:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(p.stat().st_mtime for p in earlier)))
    dest, n = d / "launches" / stamp, 2
    while dest.exists():
        dest, n = d / "launches" / f"{stamp}-{n}", n + 1
    dest.mkdir(parents=True)
    for p in earlier:
        p.rename(dest / p.name)


def saved_config(plan):
    """The run config for run.yaml: a hub id stays the hub id, pinned to the commit trained from (the cache path is
    in launch.sh), so the saved file re-runs the same weights on any machine."""
    cfg = plan.config
    if plan.hub is None:
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.model.name_or_path, cfg.model.revision = plan.hub.repo_id, plan.hub.commit or plan.hub.revision
    return cfg


def fetch_hub_model(hub, environ) -> str:
    """Download (or, offline, find) ``hub`` (a :class:`qwenvl.hub.HubModel`) in the HF cache of this node, with
    huggingface_hub's progress bars; the snapshot folder. Each node's ``vlsft train`` does it before starting its
    torchrun, so the ranks get a local folder and need no network or token; HubError (one line) otherwise."""
    from qwenvl.hub import HubError, download

    what = f"{hub.repo_id} (revision {hub.revision})"
    typer.secho(f"# model: {what}: {hub.state()} ({hub.cache}); "
                + ("HF_HUB_OFFLINE is on: using the cache" if hub.offline else f"checking {hub.endpoint} for "
                   "what is missing"), err=True)
    folder = download(hub.repo_id, hub.revision, environ)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise HubError(f"{what} has no config.json: it is not a transformers model (its files are in {folder})")
    typer.secho(f"# model: {what} is in {folder}", err=True)
    return folder


def fetch_hub_datasets(cfg, environ) -> None:
    """The LLaMA-Factory ``hf_hub_url`` datasets the run uses, into this node's Hugging Face cache before the plan
    reads them (:mod:`qwenvl.data.hub_datasets`); HubError (one line) otherwise."""
    from qwenvl import storage
    from qwenvl.data import hub_datasets

    path = cfg.data.dictionary
    if storage.is_url(path):
        return
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        path = str(cfg.base_dir / path)
    entries = hub_datasets.used_entries(path, [*(cfg.data.use or []), *(cfg.data.eval or [])])
    if entries:
        hub_datasets.fetch(entries, environ, lambda line: typer.secho(line, err=True))


def build_tiny_if_asked(cfg) -> None:
    m = cfg.model
    if not m.build_tiny:
        return
    path = Path(m.name_or_path)
    if not path.is_absolute():
        path = cfg.base_dir / path
    from qwenvl.tiny import ensure_tiny_model, is_tiny_model, refuse_foreign_folder

    if (path / "config.json").exists() and is_tiny_model(path):
        return
    refuse_foreign_folder(path)  # never build over (and so delete) a folder vlsft did not make
    if (path / "config.json").exists():
        return  # the user's own model: build_tiny has nothing to do
    typer.secho(f"model.build_tiny: building a tiny random Qwen2.5-VL in {path} (first run only, no download)",
                err=True)
    ensure_tiny_model(path)


def gpu_memory_here() -> str | None:
    """The smallest GPU memory on this machine as ``NMiB`` (``nvidia-smi``; torch-free), None without GPUs."""
    import shutil
    import subprocess

    from qwenvl.prechecks import cuda_visible

    smi = shutil.which("nvidia-smi")
    if not smi or not cuda_visible():
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=10).stdout
        sizes = [int(x) for x in out.split() if x.strip().isdigit()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return f"{min(sizes)}MiB" if sizes else None


@app.command("train")
def train(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False),
    config: Path = typer.Option(..., "--config", "-c", help="Run YAML (start from configs/demo.yaml or "
                                "configs/qwen2.5-vl-7b.yaml).", dir_okay=False),
    gpu_memory: str = typer.Option(None, "--gpu-memory", metavar="SIZE",
                                   help="Memory per GPU to check the plan's estimate against (default: what "
                                        "nvidia-smi reports for this machine's GPUs; none on a CPU machine)."),
) -> None:
    """Train: print the launch plan of a run YAML, save it in the output dir, run torchrun, return its status."""
    from qwenvl.problems import UserError
    from qwenvl.runpolicy import OutputLock
    from qwenvl.safe_write import name_problem
    from vlsft.cmd_plan import memory_check, render_text
    from vlsft.config import load_run_config
    from vlsft.plan import build_plan

    overrides = list(overrides or [])
    environ = dict(os.environ)
    try:
        cfg = load_run_config(config, overrides)
        try:
            build_tiny_if_asked(cfg)
        except OSError as exc:
            _fail(f"model.build_tiny: cannot build the tiny model in {cfg.model.name_or_path}: {exc.strerror or exc}")
        why = "://" not in cfg.output.dir and name_problem(cfg.output.dir, "output.dir")
        if why:  # OSError 36 (File name too long) as one line, before anything looks at the folder
            raise UserError(why)
        fetch_hub_datasets(cfg, environ)
        plan = build_plan(cfg, environ)
        if plan.hub is not None:  # a hub id: into this node's HF cache first, then the plan of those files
            fetch_hub_model(plan.hub, environ)
            plan = build_plan(cfg, environ)
        memory_check(plan, gpu_memory or gpu_memory_here())
    except UserError as exc:
        _fail(exc)

    typer.echo(render_text(plan, str(config), overrides))
    planned = _time_estimate(plan)
    for warning in plan.warnings:
        typer.secho(f"warning: {warning}", fg="yellow")

    out = plan.config.output
    if "://" in out.dir:
        _fail(f"output.dir {out.dir} must be a local or shared-filesystem folder, not a URL")
    node0 = plan.config.distributed.node_rank == 0
    lock = None
    if node0:
        try:
            (Path(out.dir) / "vlsft").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail(f"cannot write the run files into output.dir {out.dir}: {exc.strerror or exc} (check the path and "
                  "its permissions)")
        try:
            lock = OutputLock(out.dir, command=shlex.join(["vlsft", "train", "--config", str(config), *overrides]))
            lock.acquire()
        except UserError as exc:
            _fail(exc)
        for w in lock.warnings:
            typer.secho(f"warning: {w}", err=True, fg="yellow")
    try:
        rc = _resume_and_launch(plan, str(config), overrides, lock, planned)
    finally:
        if lock is not None:
            lock.release()
    raise typer.Exit(rc)


def _preflight(plan, environ) -> None:
    """Multi-node: every node reaches node 0 and runs the same plan (src/vlsft/preflight.py), or one line."""
    from qwenvl.problems import UserError

    dist = plan.config.distributed
    if dist.nnodes <= 1:
        return
    from vlsft import preflight

    typer.echo(f"# pre-flight: node {dist.node_rank} of {dist.nnodes} meets node 0 at {dist.master_addr}:"
               f"{dist.master_port}")
    try:
        preflight.run(plan, environ)
    except UserError as exc:
        _fail(exc)


def _time_estimate(plan) -> float | None:
    """The expected time per epoch on this machine's GPU kind (``nvidia-smi``), printed; the planned tokens/s per
    GPU the trainer's log compares with (None on a machine without GPUs)."""
    import shutil
    import subprocess

    from qwenvl.prechecks import cuda_visible
    from vlsft.cmd_plan import time_line

    smi = shutil.which("nvidia-smi")
    if not smi or not cuda_visible():
        return None
    try:
        name = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=10).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None
    line, rate = time_line(plan, name)
    typer.echo(line)
    return rate


def _resume_and_launch(plan, config: str, overrides: list[str], lock, planned: float | None = None) -> int:
    """Steps 4-6 of the module docstring, with the output lock held; the exit status."""
    from qwenvl.problems import UserError
    from qwenvl.runpolicy import LOCK_ENV, decide_resume
    from vlsft.launch import launch

    out = plan.config.output
    node = plan.config.distributed.node_rank

    def warn(message: str) -> None:
        typer.secho(f"warning: {message}", err=True, fg="yellow")

    try:
        resume_from = decide_resume(out.dir, out.resume, out.overwrite, warn=warn)
    except UserError as exc:
        _fail(exc)
    typer.echo(f"# resume: continuing from {resume_from}" if resume_from else "# resume: fresh start")

    if node == 0:
        try:
            saved = save_run_files(plan, Path(out.dir), config, overrides)
        except UserError as exc:  # a link in vlsft/ (a user's file there), a bad name: one line, nothing written
            _fail(exc)
        except OSError as exc:
            _fail(f"cannot write the run files into output.dir {out.dir}: {exc.strerror or exc} (check the path and "
                  "its permissions)")
        typer.echo(f"# run files saved in {saved}")

    from vlsft.plan import child_environment

    _preflight(plan, os.environ)  # after this node's own checks (output folder, lock, run files), before any rank
    env = child_environment(plan.env, os.environ)
    if planned:
        from qwenvl.timing import PLANNED_ENV

        env[PLANNED_ENV] = f"{planned:.1f}"  # the trainer logs tokens_per_second_vs_plan
    if lock is not None:
        env[LOCK_ENV] = str(lock.path)  # rank 0 sees that the run already holds the output lock
    if plan.env.get("WANDB_MODE", "disabled") != "disabled":
        env.setdefault("WANDB_DIR", out.dir)  # wandb/ next to the checkpoints, not in the current folder
        if out.run_name:
            env.setdefault("WANDB_NAME", out.run_name)
    log_path = Path(out.dir) / "vlsft" / ("torchrun.log" if node == 0 else f"torchrun-node{node}.log")
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        log_path = None
    sys.stdout.flush()
    try:
        result = launch(plan.torchrun, env, log_path=log_path)
    except OSError as exc:  # torchrun missing or not executable, or no room for the log / the child
        import errno

        if exc.errno == errno.ENOSPC:
            from qwenvl.runpolicy import no_space_message

            _fail(no_space_message(out.dir))
        _fail(f"cannot start {plan.torchrun[0]}: {exc.strerror or exc} (install torch in this environment: "
              "pip install -r requirements.txt)")
    rc = result.status
    where = f"; the launcher's full output is in {result.log}" if result.log else ""
    if rc == 0:
        typer.echo(f"# done: model, tokenizer, processor and chat template in {out.dir}")
    elif result.signal is not None:
        import signal

        name = signal.Signals(result.signal).name
        typer.secho(f"# stopped by {name} (exit {rc}): the ranks save a checkpoint when training had begun; "
                    f"resume: auto continues from it{where}", err=True)
    elif rc == 2:  # the failing rank printed its own error line
        typer.secho(f"# training stopped on the error above (exit 2){where}", err=True)
    else:
        typer.secho(f"error: training exited with status {rc}{where}", err=True, fg="red")
    return rc


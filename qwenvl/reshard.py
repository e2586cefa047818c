"""Resume a checkpoint on another world size: DeepSpeed ZeRO state converted to a universal checkpoint.

A ZeRO-1/2/3 checkpoint holds one optimizer partition per rank (``global_stepN/*zero_pp_rank_R_*optim_states.pt``),
so DeepSpeed only loads it on the world size that wrote it. When ``qwenvl.train`` resumes such a checkpoint on
another number of ranks, :func:`prepare_resume` (every rank, before the model loads):

* finds the world size that wrote it (:func:`checkpoint_world_size`: vlsft's ``vlsft-position.json``, else the
  ranks of its optimizer partitions) and refuses an incomplete one in one line (a rank's partition missing);
* rank 0 converts it with DeepSpeed's own ``deepspeed.checkpoint.ds_to_universal`` (``--inject_missing_state``:
  the HF Trainer does not write DeepSpeed's universal-checkpoint info) into a NEW folder beside it,
  ``universal-checkpoint-N/`` (built as ``universal-checkpoint-N.partial/`` and renamed when complete; the user's
  checkpoint is only read): the universal ``global_stepN/`` + ``latest_universal``, the checkpoint's small files
  (trainer state, scheduler, RNG states, vlsft's position record; ``rng_state.pth`` from rank 0's for a 1-rank
  run) and ``vlsft-universal.json`` (written last: what was converted);
* the other ranks wait for that marker (no collective: a conversion may outlast any collective timeout). A failed
  conversion is one line from rank 0; what it wrote is removed but a note for the other ranks
  (``universal-checkpoint-N.partial/vlsft-universal-failed.txt``, removed by the next attempt);
* the run's DeepSpeed config gets ``"checkpoint": {"load_universal": true}`` and resumes from the new folder.

A conversion done earlier (same source, marker present) is reused. The folder is named so that neither
``resume auto`` nor the Trainer's checkpoint rotation (``checkpoint-*``) takes it for a checkpoint. A checkpoint
without DeepSpeed state (plain DDP / one process) needs no conversion: its optimizer state is whole. Failures are
one :class:`~qwenvl.problems.UserError` line.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from qwenvl.problems import UserError

logger = logging.getLogger("qwenvl.reshard")

MARKER = "vlsft-universal.json"
POSITION_FILE = "vlsft-position.json"  # qwenvl.data.position writes it into every checkpoint
_OPTIM_RE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")
_SKIP_FILES = ("latest", "zero_to_fp32.py", "zero_to_torch.py")
POLL_S = 0.5
_STARTED = time.time()  # a failure note older than this process is a previous run's


def deepspeed_tag(ckpt: Path) -> Path | None:
    """The ``global_stepN/`` folder ``latest`` names (else the only one), None when there is no DeepSpeed state."""
    latest = ckpt / "latest"
    if latest.is_file():
        tag = ckpt / latest.read_text(encoding="utf-8", errors="replace").strip()
        return tag if tag.is_dir() else None
    tags = sorted(p for p in ckpt.glob("global_step*") if p.is_dir())
    return tags[-1] if len(tags) == 1 else None


def optimizer_ranks(tag: Path) -> list[int]:
    """The data-parallel ranks whose ZeRO optimizer partition is in ``tag`` (sorted)."""
    return sorted({int(m.group(1)) for p in tag.iterdir() if (m := _OPTIM_RE.search(p.name))})


def recorded_world_size(ckpt: Path) -> int | None:
    try:
        value = json.loads((ckpt / POSITION_FILE).read_text(encoding="utf-8")).get("world_size")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def checkpoint_world_size(ckpt: str | os.PathLike) -> int | None:
    """How many ranks wrote ``ckpt``: vlsft's position record, else its ZeRO partitions, else its RNG files."""
    ckpt = Path(ckpt)
    recorded = recorded_world_size(ckpt)
    if recorded:
        return recorded
    tag = deepspeed_tag(ckpt)
    if tag is not None and optimizer_ranks(tag):
        return max(optimizer_ranks(tag)) + 1
    ranks = [int(m.group(1)) for p in ckpt.glob("rng_state_*.pth") if (m := _RNG_RE.match(p.name))]
    if ranks:
        return max(ranks) + 1
    return 1 if (ckpt / "rng_state.pth").is_file() else None


def conversion_problem(ckpt: Path, tag: Path | None) -> str | None:
    """Why ``ckpt``'s DeepSpeed state cannot be converted (one phrase), None when every rank's partition is there."""
    if tag is None:
        return "latest names no global_step*/ folder"
    ranks = optimizer_ranks(tag)
    wrote = recorded_world_size(ckpt) or (max(ranks) + 1 if ranks else 0)
    missing = [r for r in range(wrote) if r not in ranks]
    if not ranks or missing:
        shown = ", ".join(map(str, missing[:4])) + (" ..." if len(missing) > 4 else "")
        return (f"{tag.name}/ lacks the optimizer partition of rank(s) {shown or 0} of the {max(wrote, 1)} that "
                "wrote it")
    if not list(tag.glob("*model_states.pt")):
        return f"{tag.name}/ has no model states"
    return None


def universal_folder(ckpt: Path, output_dir: str | os.PathLike) -> Path:
    """``universal-<checkpoint name>/`` beside the checkpoint (in ``output_dir`` when that folder is read-only)."""
    name = f"universal-{ckpt.name}"
    return ckpt.parent / name if os.access(ckpt.parent, os.W_OK) else Path(output_dir) / name


def _source_id(ckpt: Path, tag: Path) -> dict:
    state = ckpt / "trainer_state.json"
    return {"source": str(ckpt.resolve()), "tag": tag.name,
            "trainer_state_bytes": state.stat().st_size if state.is_file() else None,
            "ranks": len(optimizer_ranks(tag))}


def _reusable(dest: Path, source: dict) -> bool:
    try:
        done = json.loads((dest / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(done, dict) and all(done.get(k) == v for k, v in source.items())


def _copy_small_files(ckpt: Path, tmp: Path) -> None:
    """The checkpoint's own files the Trainer reads on resume (not the weights, not the DeepSpeed state)."""
    for p in ckpt.iterdir():
        if not p.is_file() or p.name in _SKIP_FILES or p.suffix in (".safetensors", ".bin") and "model" in p.name:
            continue
        shutil.copy2(p, tmp / p.name)
    if not (tmp / "rng_state.pth").exists() and (tmp / "rng_state_0.pth").exists():
        shutil.copy2(tmp / "rng_state_0.pth", tmp / "rng_state.pth")  # what a 1-rank run reads


def _run_ds_to_universal(tag: Path, out: Path) -> None:
    """DeepSpeed's converter, its prints kept out of the run's log (they end in the exception on failure)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag), output_folder=str(out / tag.name), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        ds_to_universal.main(args)


def convert(ckpt: Path, tag: Path, dest: Path) -> None:
    """Rank 0: ``ckpt``'s DeepSpeed state as a universal checkpoint in the new folder ``dest``."""
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        if not (tmp / ".vlsft-partial").is_file():
            raise UserError(f"cannot convert checkpoint {ckpt} for this world size: {tmp} exists and is not a "
                            "conversion of vlsft's; move it away and start again")
        shutil.rmtree(tmp)  # a conversion of ours that did not finish
    tmp.mkdir(parents=True)
    (tmp / ".vlsft-partial").write_text("", encoding="utf-8")
    try:
        _run_ds_to_universal(tag, tmp)
        _copy_small_files(ckpt, tmp)
        (tmp / MARKER).write_text(json.dumps({**_source_id(ckpt, tag), "created": time.time()}), encoding="utf-8")
        (tmp / ".vlsft-partial").unlink()
        tmp.rename(dest)
    except Exception as e:  # noqa: BLE001 - any converter failure is one line
        shutil.rmtree(tmp, ignore_errors=True)  # no half-converted state left; a note for the other ranks
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / ".vlsft-partial").write_text("", encoding="utf-8")
        (tmp / "vlsft-universal-failed.txt").write_text(_why(e), encoding="utf-8")
        raise UserError(f"cannot convert checkpoint {ckpt} to a universal checkpoint for this world size "
                        f"({_why(e)}); resume on the world size that wrote it, or start a new run from its "
                        f"weights (model_name_or_path={ckpt}, a new output dir)") from e


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}".rstrip(": ")


def wait_for(dest: Path, source: dict, ckpt: Path) -> None:
    """Ranks other than 0: until rank 0's conversion is there (or failed: the same line, printed by rank 0)."""
    failed = dest.with_name(dest.name + ".partial") / "vlsft-universal-failed.txt"
    while not _reusable(dest, source):
        if failed.is_file() and failed.stat().st_mtime >= _STARTED - 1:
            raise UserError(f"cannot convert checkpoint {ckpt} to a universal checkpoint "
                            f"({failed.read_text(encoding='utf-8', errors='replace').strip()})")
        time.sleep(POLL_S)


def use_universal(training_args) -> None:
    """``"checkpoint": {"load_universal": true}`` in the DeepSpeed config this run's engine will read."""
    configs = [getattr(getattr(training_args, "hf_deepspeed_config", None), "config", None)]
    plugin = getattr(training_args, "deepspeed_plugin", None)
    configs.append(getattr(plugin, "deepspeed_config", None))
    for cfg in configs:
        if isinstance(cfg, dict):
            cfg.setdefault("checkpoint", {})["load_universal"] = True


def prepare_resume(checkpoint: str | None, training_args) -> str | None:
    """The folder to resume from: ``checkpoint`` itself, or (DeepSpeed, another world size) its universal
    conversion (see the module docstring). Every rank calls it; rank 0 converts."""
    if not checkpoint or not getattr(training_args, "deepspeed", None):
        return checkpoint
    ckpt = Path(checkpoint)
    tag = deepspeed_tag(ckpt)
    wrote, world = checkpoint_world_size(ckpt), max(int(training_args.world_size), 1)
    if tag is None and not any(ckpt.glob("global_step*")) or wrote in (None, world):
        return checkpoint
    problem = conversion_problem(ckpt, tag)
    if problem:
        raise UserError(f"checkpoint {ckpt} is incomplete ({problem}), so it cannot resume on {world} rank(s); "
                        "pick an earlier checkpoint (resume=<path>)")
    dest = universal_folder(ckpt, training_args.output_dir)
    source = _source_id(ckpt, tag)
    rank0 = int(training_args.process_index) == 0
    t0 = time.time()
    reused = _reusable(dest, source)
    if not rank0:
        wait_for(dest, source, ckpt)
    elif not reused and dest.exists():
        raise UserError(f"cannot convert checkpoint {ckpt} for {world} rank(s): {dest} exists and is not its "
                        "conversion; move it away and start again")
    elif not reused:
        convert(ckpt, tag, dest)
    use_universal(training_args)
    if rank0:
        logger.info("resume: %s was written by %d rank(s), this run has %d: %s its DeepSpeed state as a universal "
                    "checkpoint in %s (%.1f s; the checkpoint itself is untouched)", ckpt, wrote, world,
                    "reusing" if reused else "converted", dest, time.time() - t0)
    return str(dest)

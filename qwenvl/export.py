"""Export a LoRA run or checkpoint: the adapter with everything needed to load it, or a merged full model.

``vlsft export RUN_OR_CHECKPOINT --out DIR [--merge]`` (:mod:`vlsft.cmd_export`) calls :func:`export`:

* the source is a LoRA folder (``adapter_config.json`` + ``vlsft-lora.json``, see :mod:`qwenvl.lora`): a run's
  output dir (its final adapter, else its newest complete checkpoint) or one ``checkpoint-N``;
* without ``--merge``: the adapter (PEFT layout, ``base_model_name_or_path`` = the base model folder), the
  fully-trained parts, tokenizer, processor (pixel limits) and chat template, and ``vlsft-export.json`` naming
  the base. :func:`load_adapter_export` loads it (PEFT ``PeftModel.from_pretrained`` + the trained parts);
* with ``--merge``: the base model with the trained parts and the adapters merged in (PEFT ``merge_and_unload``,
  on CPU), saved in the standard Hugging Face layout with the processor and chat template:
  ``AutoModelForImageTextToText`` + ``AutoProcessor`` load it without PEFT.

Before anything is written the source must be whole (:func:`source_problem`: the rule of
:func:`qwenvl.runpolicy.adapter_problem` that makes a LoRA checkpoint complete, plus the tokenizer and readable
processor settings an export carries, and manifest fields of the right types); else one line names the missing or
broken piece. ``--out`` must be a new or empty folder (never overwritten) that vlsft can write: :func:`qwenvl.safe_write.check_target` refuses a symbolic link, a path under a
file, a name longer than the filesystem allows and an unwritable folder, in one line, before the model is loaded.
The export is written by :func:`qwenvl.safe_write.atomic_folder`: into a hidden temporary folder beside ``--out``,
renamed into place, so a failed export leaves nothing half-written: the folder is removed on every error and on
SIGINT / SIGTERM / SIGHUP (:class:`ExportInterrupted`), and one left by a killed export (``kill -9``) is removed by
the next export to the same ``--out``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from qwenvl.lora import PARTS_FILE
from qwenvl.problems import UserError
from qwenvl.runpolicy import (  # noqa: F401 - TOKENIZER_FILES / PROCESSOR_FILES: names of this module too
    ADAPTER_CONFIG,
    LORA_MANIFEST,
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    adapter_problem,
    checkpoint_problem,
    is_lora_folder,
    list_checkpoints,
    processor_problem,
    processor_settings,
)
from qwenvl.safe_write import Interrupted, atomic_folder, check_target

EXPORT_MANIFEST = "vlsft-export.json"
# training state that an export does not carry
_SKIP = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "latest", "zero_to_fp32.py",
         "zero_to_torch.py", "README.md")



class ExportError(UserError):
    """An export that cannot be made (one line)."""


# A stop signal (SIGINT / SIGTERM / SIGHUP) arrived during the export; the temporary folder is removed.
ExportInterrupted = Interrupted


def source_problem(src: Path) -> str | None:
    """Why the LoRA folder ``src`` cannot be exported (one phrase naming the missing piece), or None.

    The rule that makes a LoRA checkpoint complete, :func:`qwenvl.runpolicy.adapter_problem` (adapter config,
    whole adapter weights, ``vlsft-lora.json`` readable and every file it lists whole), plus what an export needs
    besides: the fully-trained parts the manifest names (``trained_in_full``), a tokenizer and processor settings."""
    problem = adapter_problem(src)
    if problem:
        return problem
    manifest = json.loads((src / LORA_MANIFEST).read_text(encoding="utf-8"))  # adapter_problem parsed it: a dict
    problem = _manifest_types_problem(manifest)
    if problem:
        return problem
    full = manifest.get("trained_in_full") or []
    if full and PARTS_FILE not in manifest.get("files", []):
        return (f"{LORA_MANIFEST} names parts trained in full ({', '.join(map(str, full))}) but lists no "
                f"{PARTS_FILE}")
    if not any((src / f).is_file() for f in TOKENIZER_FILES):
        return f"no tokenizer ({' / '.join(TOKENIZER_FILES)})"
    if not any((src / f).is_file() for f in PROCESSOR_FILES):
        return f"no processor settings ({' / '.join(PROCESSOR_FILES)})"
    return processor_problem(src)  # each processor file parses, its pixel limits are positive whole numbers


def _manifest_types_problem(manifest: dict) -> str | None:
    """Why the fields of ``vlsft-lora.json`` that an export reads have the wrong type, or None (absent or null
    fields are allowed: ``--base`` can name the base model)."""
    files, full, base = manifest.get("files"), manifest.get("trained_in_full"), manifest.get("base_model")
    if not all(isinstance(f, str) for f in files or []):
        return f"{LORA_MANIFEST}: files must be a list of file names"
    if full is not None and not (isinstance(full, list) and all(isinstance(p, str) for p in full)):
        return f"{LORA_MANIFEST}: trained_in_full must be a list of part names (it is {full!r:.40})"
    if base is not None and not isinstance(base, str):
        return f"{LORA_MANIFEST}: base_model must be the base model folder's path (it is {base!r:.40})"
    return None


def resolve_source(path: str | os.PathLike) -> Path:
    """The LoRA folder to export from ``path`` (a run dir or a checkpoint), or :class:`ExportError`; the folder
    is whole (:func:`source_problem`)."""
    p = Path(path)
    if not p.is_dir():
        raise ExportError(f"{p} is not a folder: give a LoRA run's output dir or one of its checkpoint-N folders")
    if is_lora_folder(p):
        problem = source_problem(p)
        if problem:
            raise ExportError(f"cannot export {p}: it is incomplete ({problem}); export a complete checkpoint-N "
                              "folder of the run instead (nothing was written)")
        return p
    newest = None
    for _step, cp in reversed(list_checkpoints(p)):
        if not is_lora_folder(cp):
            continue
        problem = checkpoint_problem(cp) or source_problem(cp)
        if problem is None:
            return cp
        newest = newest or (cp, problem)
    if newest is not None:
        raise ExportError(f"cannot export {p}: no complete LoRA checkpoint (the newest, {newest[0].name}: "
                          f"{newest[1]}); export a complete checkpoint-N folder (nothing was written)")
    if (p / "config.json").is_file():
        raise ExportError(f"{p} holds a full model, not a LoRA adapter: it already loads with "
                          "AutoModelForImageTextToText (nothing to export)")
    raise ExportError(f"{p} holds no LoRA adapter (adapter_config.json) and no complete LoRA checkpoint")


def _check_out(out: Path) -> None:
    if out.is_dir() and not out.is_symlink() and any(out.iterdir()):
        raise ExportError(f"--out {out} is not empty: choose a new or empty folder (nothing was overwritten)")


def _base_of(src: Path, base: str | None) -> Path:
    meta = json.loads((src / LORA_MANIFEST).read_text(encoding="utf-8"))
    recorded = meta.get("base_model") if isinstance(meta, dict) else None  # (source_problem checked its type)
    path = Path(base or (recorded if isinstance(recorded, str) else "") or "")
    if not (path / "config.json").is_file():
        given = "given by --base" if base else f"recorded in {src / LORA_MANIFEST}"
        raise ExportError(f"the base model {path} ({given}) is not a model folder: pass --base PATH to the base "
                          "model it was trained from")
    from qwenvl.lora import model_signature, signature_mismatch

    want = meta.get("base_signature") if isinstance(meta, dict) else None
    trained_on = recorded if isinstance(recorded, str) else None
    if not isinstance(want, dict) and base and trained_on and (Path(trained_on) / "config.json").is_file():
        want = model_signature(_config_of(Path(trained_on)))  # an older manifest: the recorded base, if still there
    if isinstance(want, dict):
        diff = signature_mismatch(want, model_signature(_config_of(path)))
        if diff:
            raise ExportError(f"the base model {path} is not the one the adapter was trained on ({diff}; trained on "
                              f"{trained_on or 'another model'}): pass --base PATH to that model (nothing was written)")
    return path.resolve()


def _config_of(folder: Path) -> dict:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {folder / 'config.json'}: {e}") from None
    return data if isinstance(data, dict) else {}


def _pixel_limits(folder: Path) -> dict:
    """The processor's saved pixel limits (``processor_config.json`` first); :func:`source_problem` has checked
    that its files can be read."""
    try:
        found = processor_settings(folder)
    except ValueError as e:
        raise ExportError(f"cannot export {folder}: {e}; re-save the processor, or copy preprocessor_config.json "
                          "from the base model folder (nothing was written)") from None
    for _name, data in reversed(found):
        size = data.get("size")
        if size:
            return {"min_pixels": size.get("shortest_edge"), "max_pixels": size.get("longest_edge")}
    return {}


def export(source: str | os.PathLike, out: str | os.PathLike, *, merge: bool = False, base: str | None = None,
           say: Callable[[str], None] = lambda _m: None) -> Path:
    """Write the export (see the module docstring); returns ``out``. :class:`ExportError` /
    :class:`~qwenvl.safe_write.UnsafeTarget` before anything is written (and before the model is loaded) when the
    source is not whole or ``--out`` is not a new or empty folder vlsft can write; :class:`ExportInterrupted` on a
    stop signal (nothing is left behind)."""
    src = resolve_source(source)
    check_target(out, "--out", folder=True)  # a link, a path under a file, a too-long name, an unwritable folder
    _check_out(Path(out))
    base_dir = _base_of(src, base)
    with atomic_folder(out, "--out") as tmp:  # creating it fails here for a folder nobody can write (/proc)
        _write(src, base_dir, tmp, merge, say)
    return Path(out).absolute()


def _write(src: Path, base_dir: Path, tmp: Path, merge: bool, say) -> None:
    """The export into ``tmp`` (renamed to ``--out`` by :func:`~qwenvl.safe_write.atomic_folder`)."""
    if merge:
        _merge(src, base_dir, tmp, say)
    else:
        _copy_adapter(src, base_dir, tmp, say)
    manifest = {"source": str(src.resolve()), "base_model": str(base_dir), "merged": merge,
                **_pixel_limits(src), "lora": json.loads((src / LORA_MANIFEST).read_text(encoding="utf-8"))}
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _copy_adapter(src: Path, base_dir: Path, dst: Path, say) -> None:
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in _SKIP or f.name.startswith("rng_state"):
            continue
        say(f"copying {f.name}")
        shutil.copy2(f, dst / f.name)
    cfg = json.loads((dst / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = str(base_dir)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def _merge(src: Path, base_dir: Path, dst: Path, say) -> None:
    from peft import PeftModel

    from qwenvl.lora import load_full_parts
    from qwenvl.model import load_model, load_processor

    say(f"loading the base model {base_dir} (CPU)")
    model = load_model(str(base_dir), dtype="auto")
    n = load_full_parts(model, src)
    if n:
        say(f"loaded {n} fully-trained tensors from {src.name}")
    say("loading the adapter")
    peft_model = PeftModel.from_pretrained(model, str(src))
    say("merging the adapters into the base weights")
    merged = peft_model.merge_and_unload(progressbar=True)
    say(f"saving the merged model ({sum(p.numel() for p in merged.parameters()):,} parameters)")
    merged.save_pretrained(str(dst))
    load_processor(str(src), None if (src / "config.json").is_file() else _model_type(base_dir)).save_pretrained(
        str(dst))


def _model_type(base_dir: Path) -> str:
    from qwenvl.families import read_model_type

    return read_model_type(base_dir)


def load_adapter_export(folder: str | os.PathLike, *, dtype=None):
    """Load an un-merged export (or a LoRA checkpoint): the base model, its fully-trained parts, the adapter
    (PEFT). Returns the ``PeftModel``."""
    from peft import PeftModel

    from qwenvl.lora import load_full_parts
    from qwenvl.model import load_model

    folder = Path(folder)
    base = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))["base_model_name_or_path"]
    model = load_model(base, dtype=dtype or "auto")
    load_full_parts(model, folder)
    return PeftModel.from_pretrained(model, str(folder))

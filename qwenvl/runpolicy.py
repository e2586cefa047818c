"""Run policy: what an output folder holds and what a run may do with it (torch-free).

The one owner of these decisions; ``vlsft train`` (before launching) and ``qwenvl.train`` (in every rank)
both call them:

* file names: :data:`MODEL_FILES`, ``checkpoint-N`` folders (:func:`list_checkpoints`);
* :func:`is_complete_checkpoint` / :func:`checkpoint_problem`: ``trainer_state.json`` parses as JSON with the
  keys the Trainer writes, the weights are whole (a safetensors header parses and the file is as long as its
  offsets say; an ``*.index.json`` lists shards that all exist and are whole; a ``pytorch_model.bin`` is a
  whole zip), and the DeepSpeed state (``latest`` + ``global_step*/``) is whole when the run used DeepSpeed;
* LoRA checkpoints (PEFT layout, :mod:`qwenvl.lora`): ``adapter_config.json`` + whole adapter weights + vlsft's
  ``vlsft-lora.json`` manifest (written last) whose listed files (``trained_parts.safetensors``) are whole;
* a model folder's tokenizer (:data:`TOKENIZER_FILES`) and processor settings (:data:`PROCESSOR_FILES`,
  :func:`processor_settings`: each file parses and its pixel / patch numbers are positive whole numbers);
* :func:`run_markers`: what shows that a folder already holds a run (one list for the plan and the trainer);
* :func:`decide_resume`, :func:`check_resumable`, :func:`set_aside_old_checkpoints`;
* DeepSpeed presets: :data:`DEEPSPEED_PRESETS`, :func:`deepspeed_off` (the words for "no DeepSpeed"),
  :func:`deepspeed_preset_path`, :func:`deepspeed_path` (a run YAML's value -> a JSON path);
* :class:`OutputLock`: one writer per output folder (``<output_dir>/vlsft/lock``, see its docstring).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import stat
import struct
import sys
import time
import zipfile
from pathlib import Path

from qwenvl.problems import UserError

logger = logging.getLogger("qwenvl.runpolicy")

# ---------------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------------
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
TRAINER_STATE = "trainer_state.json"
TRAINER_STATE_KEYS = ("global_step", "log_history")  # written by every transformers.TrainerState.save_to_json
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# LoRA (qwenvl.lora): PEFT's adapter layout + vlsft's trained parts and manifest (written last, listing its files)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
LORA_MANIFEST = "vlsft-lora.json"
# what a model folder carries besides the weights for inference and export (qwenvl.infer, qwenvl.export)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
RUN_FILES = (*MODEL_FILES, *ADAPTER_FILES, ADAPTER_CONFIG, TRAINER_STATE, "config.json")  # = an earlier run
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
DEEPSPEED_OFF = frozenset({"", "none", "off", "false", "no"})
LOCK_NAME = "lock"
LOCK_ENV = "VLSFT_OUTPUT_LOCK"  # set by `vlsft train` for its ranks: the lock it holds (rank 0 does not retake it)


def deepspeed_off(value) -> bool:
    """``None`` / ``False`` / ``none`` / ``off`` / ``false`` / ``no`` / empty: no DeepSpeed (plain DDP)."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in DEEPSPEED_OFF)


def deepspeed_preset_path(name: str) -> Path | None:
    """``zero2`` / ``zero3`` / ``zero3_offload`` -> the shipped ``configs/<name>.json``; anything else -> None."""
    return REPO_CONFIGS / f"{name}.json" if name in DEEPSPEED_PRESETS else None


def deepspeed_path(name: str, base: Path) -> str | None:
    """A run YAML's ``distributed.deepspeed``: a preset -> the shipped ``configs/<name>.json``; off -> None;
    a URL as is; a path -> absolute (relative paths start at ``base``, the run YAML's folder)."""
    if deepspeed_off(name):
        return None
    preset = deepspeed_preset_path(name)
    if preset is not None:
        return str(preset)
    if "://" in name:
        return name
    p = Path(os.path.expanduser(name))
    return str(p if p.is_absolute() else (Path(base) / p).resolve())


# ---------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------
def _safetensors_problem(path: Path) -> str | None:
    """None when ``path`` is a whole safetensors file (header parses, size = 8 + header + data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, 100 << 20):
                return f"{path.name} is truncated (header of {n} bytes in a {size}-byte file)"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return f"{path.name} has a broken header"
    if not isinstance(header, dict):
        return f"{path.name} has a broken header"
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(x, int) for x in offsets)):
            return f"{path.name} has a broken header (tensor {key})"
        end = max(end, offsets[1])
    if size != 8 + n + end:
        return f"{path.name} is truncated ({size} bytes, the header says {8 + n + end})"
    return None


def _weights_problem(d: Path, name: str) -> str | None:
    p = d / name
    if name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(p.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{name} is not a readable shard index"
        for shard in shards:
            if not (d / shard).is_file():
                return f"{name} lists {shard}, which is missing"
            problem = _weights_problem(d, shard)
            if problem:
                return problem
        return None
    if name.endswith(".safetensors"):
        return _safetensors_problem(p)
    if not zipfile.is_zipfile(p):  # torch.save writes a zip; a cut file has no central directory
        return f"{name} is truncated (not a whole zip)"
    return None


def _deepspeed_problem(d: Path) -> str | None:
    """DeepSpeed state (``latest`` naming a ``global_step*`` folder with model and optimizer states), if any."""
    tags = [p for p in d.glob("global_step*") if p.is_dir()]
    latest = d / "latest"
    if not tags and not latest.exists():
        return None  # not a DeepSpeed checkpoint
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        tags = [d / tag] if tag else []
        if not tags or not tags[0].is_dir():
            return f"latest names {tag or '(nothing)'}, which is missing"
    elif not tags:
        return "latest is not a file"
    for tag in tags:
        states = list(tag.glob("*model_states.pt"))
        optim = list(tag.glob("*optim_states.pt"))
        if not states or not optim:
            return f"{tag.name}/ lacks its model or optimizer states"
        for f in states + optim:
            if not zipfile.is_zipfile(f):
                return f"{tag.name}/{f.name} is truncated"
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete checkpoint (one phrase), or None when it is complete."""
    d = Path(path)
    state = d / TRAINER_STATE
    if not state.is_file():
        return f"no {TRAINER_STATE}"
    try:
        data = json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{TRAINER_STATE} is truncated or not JSON"
    if not isinstance(data, dict) or any(k not in data for k in TRAINER_STATE_KEYS):
        return f"{TRAINER_STATE} lacks {', '.join(k for k in TRAINER_STATE_KEYS if not isinstance(data, dict) or k not in data)}"
    ds = _deepspeed_problem(d)
    if ds:
        return ds
    if (d / ADAPTER_CONFIG).exists():
        return adapter_problem(d)
    present = [f for f in MODEL_FILES if (d / f).is_file()]
    if not present:
        if any(d.glob("global_step*")):  # ZeRO-3 without gathered 16-bit weights: the weights live in the DS state
            return None
        return "no weights"
    for name in present:
        problem = _weights_problem(d, name)
        if problem:
            return problem
    return None


def adapter_problem(d: Path) -> str | None:
    """A LoRA folder: ``adapter_config.json`` parses, the adapter weights are whole, and vlsft's manifest
    (written after everything else) parses and every file it lists is whole."""
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{ADAPTER_CONFIG} is truncated or not JSON"
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        return f"{ADAPTER_CONFIG} is not a PEFT adapter config"
    present = [f for f in ADAPTER_FILES if (d / f).is_file()]
    if not present:
        return "no adapter weights (adapter_model.safetensors)"
    problem = _weights_problem(d, present[0])
    if problem:
        return problem
    try:
        manifest = json.loads((d / LORA_MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {LORA_MANIFEST} (the save did not finish)"
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{LORA_MANIFEST} is truncated or not JSON"
    files = manifest.get("files", []) if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return f"{LORA_MANIFEST} lists no files"
    for name in files:
        if not (d / str(name)).is_file():
            return f"{LORA_MANIFEST} lists {name}, which is missing"
        problem = _weights_problem(d, str(name))
        if problem:
            return problem
    return None


# numbers of an image processor's settings (top level or in ``size``) that must be positive whole numbers
_PROCESSOR_NUMBERS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size")
_SIZE_NUMBERS = ("shortest_edge", "longest_edge", "min_pixels", "max_pixels")


def _whole(value) -> bool:
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) and value > 0


def _settings_problem(data) -> str | None:
    """Why one processor file's parsed JSON cannot be used as Qwen image processor settings, or None."""
    if not isinstance(data, dict):
        return f"is not a JSON object (it holds {type(data).__name__ if data is not None else 'null'})"
    where = ""
    nested = data.get("image_processor")
    if nested is not None:  # processor_config.json: the image processor's settings under "image_processor"
        if not isinstance(nested, dict):
            return f"has image_processor {nested!r:.40}, not an object of settings"
        if nested:
            data, where = nested, "image_processor."
    for key in _PROCESSOR_NUMBERS:
        if data.get(key) is not None and not _whole(data[key]):
            return f"has {where}{key} {data[key]!r:.40}, not a positive whole number"
    size = data.get("size")
    if size is None:
        return None
    if not isinstance(size, dict):
        return f"has {where}size {size!r:.40}, not an object (shortest_edge, longest_edge: pixels)"
    for key in _SIZE_NUMBERS:
        if size.get(key) is not None and not _whole(size[key]):
            return f"has {where}size.{key} {size[key]!r:.40}, not a positive whole number"
    # the processor reads both bounds from size (min_pixels / max_pixels beside it replace them): none is missing
    lo = data.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels")
    hi = data.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels")
    if (lo is None) != (hi is None) or (lo is None and hi is None):
        missing = "shortest_edge" if lo is None else "longest_edge"
        return f"has a {where}size without {missing} (it needs shortest_edge and longest_edge, in pixels)"
    return None


def processor_settings(folder: str | os.PathLike) -> list[tuple[str, dict]]:
    """``(file name, image processor settings)`` for each processor file saved in ``folder``
    (:data:`PROCESSOR_FILES` order; a ``processor_config.json``'s nested ``image_processor`` settings). A file
    that cannot be used is a ``ValueError`` whose message names it and what is wrong (``PATH:LINE:COL is not valid
    JSON (...)``, ``PATH has size.longest_edge 'abc', not a positive whole number``)."""
    found = []
    for name in PROCESSOR_FILES:
        f = Path(folder) / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_bytes().decode("utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}:{e.lineno}:{e.colno} is not valid JSON ({e.msg})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{f} is not UTF-8 text") from None
        except OSError as e:
            raise ValueError(f"{f} cannot be read ({e.strerror or e})") from None
        problem = _settings_problem(data)
        if problem:
            raise ValueError(f"{f} {problem}")
        nested = data.get("image_processor")
        found.append((name, nested if isinstance(nested, dict) and nested else data))
    return found


def processor_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder``'s saved processor settings cannot be used (:func:`processor_settings`), or None."""
    try:
        processor_settings(folder)
    except ValueError as e:
        return str(e)
    return None


def is_lora_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return checkpoint_problem(path) is None


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``checkpoint-N`` folder, oldest first."""
    d = Path(output_dir)
    try:
        children = list(d.iterdir())
    except OSError:
        return []
    out = []
    for child in children:
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir():
            out.append((int(m.group(1)), child))
    return sorted(out)


def run_markers(output_dir: str | os.PathLike) -> list[str]:
    """What in ``output_dir`` shows an earlier run: ``checkpoint-N`` folders (oldest first), then a saved model
    or trainer state. vlsft's own ``vlsft/`` folder (run files, lock) does not count."""
    d = Path(output_dir)
    found = [p.name for _, p in list_checkpoints(d)]
    found += [f for f in RUN_FILES if (d / f).is_file()]
    return found


def decide_resume(output_dir: str, resume: str, overwrite: bool, warn=None) -> str | None:
    """The checkpoint to resume from (None = fresh start), or :class:`UserError` when refused.

    ``resume auto`` takes the newest *complete* checkpoint; each newer incomplete one is skipped with a warning
    (``warn(message)``; default: this module's logger)."""
    warn = warn or logger.warning
    resume = (resume or "auto").strip()
    if resume.lower() in ("auto", "never"):
        resume = resume.lower()
    if resume not in ("auto", "never"):
        if not Path(resume).is_dir():
            raise UserError(f"resume checkpoint {resume} does not exist: give an existing checkpoint-N folder, "
                            "or resume=auto / never")
        problem = checkpoint_problem(resume)
        if problem:
            raise UserError(f"resume checkpoint {resume} is incomplete ({problem}): pick an earlier checkpoint")
        return str(resume)
    if resume == "auto":
        for step, path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return str(path)
            warn(f"resume auto skips the incomplete checkpoint {path} (step {step}: {problem})")
    markers = run_markers(output_dir)
    if markers and not overwrite:
        shown = ", ".join(markers[:4]) + (" …" if len(markers) > 4 else "")
        if resume == "auto":  # nothing complete to resume from, yet the folder is not empty
            raise UserError(f"output_dir {output_dir} holds an earlier run ({shown}) but no complete checkpoint to "
                            "resume: train over it with overwrite=true, resume=<checkpoint path>, or choose a new "
                            "output dir")
        raise UserError(f"output_dir {output_dir} already holds a run ({shown}); resume it with resume=auto, "
                        "train over it with overwrite=true, or choose a new output dir")
    return None


def check_resumable(checkpoint: str | None, deepspeed) -> None:
    """DeepSpeed resumes from its own state (``global_step*/``), which a checkpoint saved with
    ``save_only_model`` or by a run without DeepSpeed lacks: a :class:`UserError` instead of a traceback per rank."""
    if checkpoint and not deepspeed_off(deepspeed) and not any(Path(checkpoint).glob("global_step*")):
        raise UserError(f"checkpoint {checkpoint} has no DeepSpeed state (global_step*/: saved with save_only_model "
                        "or without DeepSpeed), so a DeepSpeed run cannot resume from it; start a new run from its "
                        f"weights (model_name_or_path={checkpoint}, a new output_dir) or resume without DeepSpeed")


def set_aside_old_checkpoints(output_dir: str) -> Path | None:
    """Fresh start with overwrite: move the earlier run - its ``checkpoint-*`` folders, its final model and state
    files, its other folders (logs) - into ``superseded-<time>/``, so that a later ``resume auto`` cannot pick up
    the old checkpoints and the new final save writes over nothing (nothing is deleted). vlsft's own ``vlsft/``
    (the new run's record and lock), earlier ``superseded-*`` folders and hidden entries stay."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    earlier = sorted(p for p in out.iterdir() if p.name != "vlsft" and not p.name.startswith(("superseded-", ".")))
    if not earlier:
        return None
    dest = out / time.strftime("superseded-%Y%m%d-%H%M%S")
    n = 2
    while dest.exists():  # a second overwrite within the same second
        dest = out / time.strftime(f"superseded-%Y%m%d-%H%M%S-{n}")
        n += 1
    dest.mkdir(parents=True)
    for path in earlier:
        path.rename(dest / path.name)
    cps = sum(1 for p in earlier if p.name.startswith("checkpoint-"))
    logger.warning("overwrite: moved the earlier run (%d checkpoint(s), %d other file(s)/folder(s)) to %s", cps,
                   len(earlier) - cps, dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# one writer per output folder
# ---------------------------------------------------------------------------------------------------
class OutputLocked(UserError):
    """Another run writes into this output folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _kind_problem(path: Path, mode: int, folder: bool) -> str | None:
    """Why vlsft must not write at ``path`` of mode ``mode`` (a symbolic link, or not a folder / regular file)."""
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return (f"{path} is a symbolic link (to {target}) and vlsft never writes through a link there; nothing was "
                f"written: remove the link (rm {path}: what it points to stays as it is) and start again")
    if not (stat.S_ISDIR if folder else stat.S_ISREG)(mode):
        kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"), (stat.S_ISFIFO, "a named pipe"),
                 (stat.S_ISSOCK, "a socket"))
        kind = next((name for test, name in kinds if test(mode)), "a device")
        return (f"{path} is {kind}, not {'a folder' if folder else 'a regular file'}; nothing was written: remove it "
                "and start again")
    return None


def _not_ours(path: Path, folder: bool) -> str | None:
    """:func:`_kind_problem` of what is at ``path`` (not followed); None when nothing is there."""
    try:
        return _kind_problem(path, os.lstat(path).st_mode, folder)
    except OSError:
        return None


class OutputLock:
    """``<output_dir>/vlsft/lock``: JSON ``{host, pid, started, command}`` of the one run writing there.

    Taken by ``vlsft train`` before launching (its ranks see :data:`LOCK_ENV` and do not retake it) and by rank 0
    of ``python -m qwenvl.train`` started on its own; held (an ``flock`` on the open file) while the run lives,
    removed at exit. A second run is refused in one line naming the holder. A lock left by a dead process on this
    host (kill -9, power loss) is taken over with a warning; one written on another host cannot be checked from
    here, so it is refused with how to remove it when that run is dead.

    Never written through a link: a ``vlsft/`` folder or a ``lock`` that is a symbolic link, a lock that is not
    a regular file or that shares its data with another name (a hard link) is refused in one line, untouched.
    """

    def __init__(self, output_dir: str | os.PathLike, command: str = ""):
        self.path = Path(output_dir) / "vlsft" / LOCK_NAME
        self.command = command or " ".join(sys.argv)
        self.fd: int | None = None
        self.warnings: list[str] = []

    def _describe(self, info: dict) -> str:
        started = info.get("started")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
        cmd = str(info.get("command") or "?")
        cmd = cmd if len(cmd) <= 120 else cmd[:117] + "..."
        return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, started {when}: {cmd}"

    @staticmethod
    def _read(fd: int) -> dict | None:
        try:
            raw = os.pread(fd, 65536, 0)
            info = json.loads(raw.decode("utf-8")) if raw.strip() else None
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return info if isinstance(info, dict) else None

    def _unsafe(self, problem: str) -> UserError:
        return UserError(f"cannot take the output lock of output_dir {self.path.parent.parent}: {problem}")

    def _open_folder(self) -> int:
        """``<output_dir>/vlsft/`` (made when missing), opened without following a link."""
        folder = self.path.parent
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(folder)
            except FileExistsError:
                pass
            return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            problem = _not_ours(folder, folder=True)
            if problem:
                raise self._unsafe(problem) from None
            raise UserError(f"cannot create {folder}: {e.strerror or e} (check output.dir and its "
                            "permissions)") from e

    def _open_lock(self, dfd: int) -> int:
        """The lock file in the open ``vlsft/`` folder ``dfd`` (made when missing): never through a link, only a
        regular file with no other name."""
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644, dir_fd=dfd)
        except OSError as e:
            problem = _not_ours(self.path, folder=False)
            if problem:
                raise self._unsafe(problem) from None
            raise UserError(f"cannot open the output lock {self.path}: {e.strerror or e}") from e
        st = os.fstat(fd)
        problem = _kind_problem(self.path, st.st_mode, folder=False)
        if problem is None and st.st_nlink > 1:
            problem = (f"{self.path} has {st.st_nlink} hard links (its data is also another file's, which taking "
                       "the lock would overwrite); nothing was written: remove it and start again")
        if problem:
            os.close(fd)
            raise self._unsafe(problem)
        return fd

    def acquire(self) -> OutputLock:
        dfd = self._open_folder()
        try:
            return self._acquire(dfd)
        finally:
            os.close(dfd)

    def _acquire(self, dfd: int) -> OutputLock:
        import fcntl

        host = socket.gethostname()
        for _ in range(20):
            fd = self._open_lock(dfd)
            flocked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                info = self._read(fd) or {}
                os.close(fd)
                raise OutputLocked(
                    f"output_dir {self.path.parent.parent} is in use by another run ("
                    f"{self._describe(info) if info else 'starting up'}); wait for it to finish, stop it, or choose "
                    f"another output dir") from None
            except OSError:  # a filesystem without flock: fall back to the recorded pid
                flocked = False
            try:
                same = os.fstat(fd).st_ino == os.stat(LOCK_NAME, dir_fd=dfd, follow_symlinks=False).st_ino
            except OSError:
                same = False
            if not same:  # removed/replaced by its holder between our open and flock: try again
                os.close(fd)
                continue
            info = self._read(fd)
            if info and info.get("pid") != os.getpid():
                if info.get("host") != host:
                    os.close(fd)
                    raise OutputLocked(
                        f"output_dir {self.path.parent.parent} is locked by a run on another host "
                        f"({self._describe(info)}); if that run is no longer alive, delete {self.path} and start "
                        "again; otherwise choose another output dir")
                pid = info.get("pid")
                alive = isinstance(pid, int) and _pid_alive(pid)
                if alive and not flocked:
                    os.close(fd)
                    raise OutputLocked(f"output_dir {self.path.parent.parent} is in use by another run "
                                       f"({self._describe(info)}); wait for it to finish, stop it, or choose "
                                       "another output dir")
                why = "no longer running" if not alive else "holds no lock"
                self.warnings.append(f"took over the stale output lock {self.path} ({self._describe(info)}; "
                                     f"that process is {why})")
            record = {"host": host, "pid": os.getpid(), "started": time.time(), "command": self.command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
            try:
                os.fsync(fd)
            except OSError:
                pass
            self.fd = fd
            return self
        raise OutputLocked(f"could not take the output lock {self.path}: it keeps changing; is another run "
                           "starting there?")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            info = self._read(self.fd)
            if info and info.get("pid") == os.getpid() and os.lstat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

def no_space_message(path: str | os.PathLike) -> str:
    """The one line for a full disk: where, how much is free, what to do."""
    import shutil

    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**20:,.0f} MB free"
    except OSError:
        free = "free space unknown"
    return f"no space left on the device holding {path} ({free}): free space there or move output.dir"


def is_no_space(e: BaseException) -> bool:
    """``e`` (or what caused it) is a full disk: errno ENOSPC, or a library's error carrying its text (safetensors
    raises its own type with the OS message)."""
    import errno

    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        e, seen = (e.__cause__ or e.__context__), seen + 1
    return False


# ---------------------------------------------------------------------------------------------------
# what a checkpoint was trained with: compared on resume (vlsft-run.json)
# ---------------------------------------------------------------------------------------------------
RUN_RECORD = "vlsft-run.json"
#: the settings whose change makes a checkpoint's weights or optimizer state unloadable
SETTING_WORDS = {"model_type": "model_type", "trained_in_full": "parts trained in full (tune_mm_*)",
                 "lora": "LoRA", "trainable": "trainable parameters"}
#: the settings a resume does not apply (the checkpoint's optimizer and scheduler state continue)
SCHEDULE_KEYS = ("learning_rate", "lr_scheduler_type", "mm_projector_lr", "vision_tower_lr", "warmup_ratio",
                 "warmup_steps")


def write_json_record(folder: str | os.PathLike, name: str, record: dict) -> None:
    """``<folder>/<name>`` as one line of JSON, written to a temporary name and renamed."""
    path = Path(folder) / name
    tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json_record(folder: str | os.PathLike | None, name: str) -> dict | None:
    """``<folder>/<name>`` as a dict; None when there is no folder, no file, or it is not a JSON object."""
    if not folder:
        return None
    try:
        record = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_run_record(folder: str | os.PathLike, record: dict) -> None:
    """``<folder>/vlsft-run.json`` (samples trained so far, the run's settings and schedule), written atomically."""
    write_json_record(folder, RUN_RECORD, record)


def read_run_record(folder: str | os.PathLike | None) -> dict | None:
    """The checkpoint's ``vlsft-run.json``, None when absent or unreadable (a checkpoint of an older vlsft)."""
    return read_json_record(folder, RUN_RECORD)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, dict):
        return " ".join(f"{k} {_shown(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(x) for x in value) + "]" if value else "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:,}" if isinstance(value, int) else str(value)


def settings_mismatch(checkpoint: str, recorded: dict | None, current: dict, keys=None) -> str | None:
    """One line when the checkpoint's recorded settings (``vlsft-run.json``'s ``settings``) differ from this
    run's in what the weights and optimizer state depend on (model family, LoRA, trained parts); None when they
    match or the checkpoint records none. ``keys``: compare only these (those known at the time)."""
    if not recorded:
        return None
    keys = [k for k in (keys or SETTING_WORDS) if k in recorded and k in current]
    diffs = [f"{SETTING_WORDS.get(k, k)} {_shown(recorded[k])} (this run: {_shown(current[k])})"
             for k in keys if recorded[k] != current[k]]
    if not diffs:
        return None
    return (f"cannot resume {checkpoint}: it was written with {'; '.join(diffs)}; resume with the same settings, "
            "or start a new run (a new output.dir, or output.resume=never with output.overwrite=true)")


def load_failure_message(checkpoint: str, e: BaseException) -> str:
    """A checkpoint that fails to load into this run's model or optimizer (no ``vlsft-run.json`` to compare)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"cannot resume {checkpoint}: its weights or optimizer state do not fit this run's model ({first[:300]}); "
            "it was probably written with other settings (model family, LoRA on/off or r, tune_mm_*): resume with "
            "the same settings, or start a new run (a new output.dir, or output.resume=never with "
            "output.overwrite=true)")


def schedule_changes(recorded: dict | None, current: dict) -> list[tuple[str, object, object]]:
    """``(key, checkpoint's value, this run's value)`` for each learning-rate setting that differs."""
    if not recorded:
        return []
    return [(k, recorded[k], current.get(k)) for k in SCHEDULE_KEYS
            if k in recorded and k in current and recorded[k] != current[k]]


def schedule_warning(checkpoint: str, changes: list[tuple[str, object, object]]) -> str:
    shown = ", ".join(f"{k} {_shown(new)} (checkpoint: {_shown(old)})" for k, old, new in changes)
    return (f"resume: {shown} not applied: the optimizer and scheduler state of {checkpoint} continue its "
            "schedule; start a new run (a new output.dir, or output.resume=never with output.overwrite=true, "
            f"model.name_or_path={checkpoint}) to train with other values")

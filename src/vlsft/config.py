"""Load a run YAML: read the file, apply ``KEY=VALUE`` overrides, validate, translate every error into a
:class:`qwenvl.problems.Problem` with ``file:line:column`` (torch-free).

:func:`load_run_config` is the entry point; it raises :class:`qwenvl.problems.ProblemsError` listing every
problem found (YAML syntax, unknown key with a did-you-mean, wrong type, inconsistent batch settings, a
literal secret). Imports run one way: ``yamlmarks`` <- ``schema`` <- ``overrides`` <- ``config``.
The schema itself lives in :mod:`vlsft.schema` (its names are re-exported here); relative paths resolve
against the YAML file's folder in :mod:`vlsft.plan`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from qwenvl.problems import Problem, ProblemsError, did_you_mean
from qwenvl.runpolicy import DEEPSPEED_PRESETS  # noqa: F401 - re-exported
from vlsft.overrides import apply_overrides
from vlsft.schema import (  # noqa: F401 - re-exported: the schema's public names
    LR_SCHEDULER_TYPES,
    SECRET_FIELDS,
    SECTIONS,
    DataSection,
    DistributedSection,
    ModelSection,
    OutputSection,
    RunConfig,
    StorageSection,
    TrainingSection,
    WandbSection,
)
from vlsft.yamlmarks import Marks, location, parse_yaml_text


def _model_at(path: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the mapping at ``path`` (None inside free-form dicts/lists)."""
    model: type[BaseModel] = RunConfig
    for part in path:
        info = model.model_fields.get(part) if isinstance(part, str) else None
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return None
        model = info.annotation
    return model


_MISSING_EXAMPLES = {
    ("model",): "a model section, e.g. model: {name_or_path: /models/Qwen2.5-VL-7B-Instruct, tune_mm_mlp: true, "
                "tune_mm_llm: true}",
    ("model", "name_or_path"): "name_or_path: /models/Qwen2.5-VL-7B-Instruct (a local model folder) or "
                                  "Qwen/Qwen2.5-VL-7B-Instruct (a hub id)",
    ("data",): "a data section, e.g. data: {dictionary: Dataset-Dictionary.json}",
    ("data", "dictionary"): "dictionary: Dataset-Dictionary.json (path relative to this YAML's folder)",
    ("output",): "an output section, e.g. output: {dir: runs/my-first-run} (a new folder for every fresh run)",
    ("output", "dir"): "dir: runs/my-first-run (a new folder for every fresh run)",
}


def _clean_message(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


def _shown(value: Any) -> str:
    if value is None:
        return "an empty value (null)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_hint(err: dict, loc: tuple) -> str | None:
    """How to fix a pydantic type/range error, in the run YAML's terms."""
    kind, value = err["type"], err.get("input")
    owner = _model_at(loc[:-1])
    info = owner.model_fields.get(loc[-1]) if owner is not None and isinstance(loc[-1], str) else None
    if kind == "literal_error":
        expected = [x.strip(" '") for x in re.split(r",| or ", err.get("ctx", {}).get("expected", "")) if x.strip(" '")]
        return (did_you_mean(str(value).lower(), expected) if isinstance(value, str) else None) or \
            ("write one of: " + ", ".join(expected))
    if kind.startswith("bool"):
        return "write true or false"
    if kind.startswith("int"):
        return "write a whole number, e.g. 4"
    if kind.startswith("float"):
        return "write a number, e.g. 2.0e-5 (quotes are not needed)"
    if kind == "dict_type":
        return "write a mapping, e.g. extra: {optim: adamw_torch_fused}" if loc[-1] == "extra" else \
            "write a mapping of keys (key: value on indented lines below it)"
    if kind in ("list_type",):
        return "write a list, e.g. [docs, charts%50]"
    if value is None and kind == "string_type":
        return "give a value (an empty value is null), or delete the key to use the default"
    if info is not None and info.description:
        return f"{loc[-1]}: {info.description[0].lower()}{info.description[1:]}"
    return None


def _pydantic_problems(exc: ValidationError, marks: Marks, source: str) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(loc[:-1])
            hint = did_you_mean(str(loc[-1]), owner.model_fields) if owner else None
            head, dot, tail = str(loc[-1]).partition(".")
            if dot and owner is RunConfig and head in RunConfig.model_fields:
                hint = f"dotted keys are for the command line; in the file nest it: {head}: {{{tail}: ...}}"
            if hint is None and owner is not None:
                hint = "known keys: " + ", ".join(owner.model_fields)
                if owner is RunConfig:
                    hint += " (top-level keys starting with x- are ignored: a place for YAML anchors)"
            problems.append(Problem("error", "unknown key", key=dotted, hint=hint,
                                    **location(marks, source, loc, key_mark=True)))
        elif kind == "missing":
            owner = _model_at(loc[:-1])
            desc = owner.model_fields[loc[-1]].description if owner and loc[-1] in owner.model_fields else None
            example = _MISSING_EXAMPLES.get(loc)
            hint = f"add {example}" if example else (f"add '{loc[-1]}:' ({desc})" if desc else None)
            problems.append(Problem("error", "missing required key", key=dotted, hint=hint,
                                    **location(marks, source, loc[:-1], key_mark=True)))
        else:
            message = _clean_message(err["msg"])
            secret = loc[:1] == ("storage",) and loc[-1] in SECRET_FIELDS
            if kind != "value_error" and "input" in err and not secret:
                message += f", got {_shown(err['input'])}"
            hint = None if secret or kind == "value_error" else _type_hint(err, loc)
            problems.append(Problem("error", message, key=dotted, hint=hint,
                                    **location(marks, source, loc, key_mark=False)))
    return problems


def _semantic_problems(cfg: RunConfig, source: str) -> list[Problem]:
    """Cross-field checks; also solves gradient_accumulation_steps from global_batch_size (in place)."""
    problems: list[Problem] = []
    tr, dist = cfg.training, cfg.distributed
    per_step = tr.per_device_train_batch_size * dist.nproc_per_node * dist.nnodes
    formula = (f"{tr.per_device_train_batch_size} per device x {dist.nproc_per_node} per node x "
               f"{dist.nnodes} node(s) = {per_step}")
    if tr.global_batch_size is not None:
        if tr.global_batch_size % per_step:
            lower = max(per_step, tr.global_batch_size // per_step * per_step)
            problems.append(Problem("error", f"global_batch_size {tr.global_batch_size} is not a multiple of "
                                    f"{formula}", key="training.global_batch_size",
                                    hint=f"use {lower} or {lower + per_step}, or change the per-device batch",
                                    **cfg.where("training", "global_batch_size")))
        else:
            solved = tr.global_batch_size // per_step
            if tr.gradient_accumulation_steps is not None and tr.gradient_accumulation_steps != solved:
                problems.append(Problem("error", f"gradient_accumulation_steps {tr.gradient_accumulation_steps} "
                                        f"contradicts global_batch_size {tr.global_batch_size} ({formula} needs "
                                        f"{solved})", key="training.gradient_accumulation_steps",
                                        hint="set only one of the two",
                                        **cfg.where("training", "gradient_accumulation_steps")))
            tr.gradient_accumulation_steps = solved
    elif tr.gradient_accumulation_steps is None:
        tr.gradient_accumulation_steps = 1
    if tr.max_steps <= 0 and tr.num_train_epochs == 0:
        problems.append(Problem("error", "nothing to train: num_train_epochs is 0 and max_steps is not set",
                                key="training.num_train_epochs", hint="set num_train_epochs > 0 (e.g. 1, or 0.5 "
                                "for half an epoch) or max_steps > 0", **cfg.where("training", "num_train_epochs")))
    if not math.isfinite(tr.num_train_epochs):
        problems.append(Problem("error", "must be a finite number", key="training.num_train_epochs",
                                hint="e.g. num_train_epochs: 3", **cfg.where("training", "num_train_epochs")))
    if dist.node_rank >= dist.nnodes:
        problems.append(Problem("error", f"node_rank {dist.node_rank} must be below nnodes {dist.nnodes}",
                                key="distributed.node_rank", hint=f"machines count 0 .. {dist.nnodes - 1}; "
                                "raise distributed.nnodes or lower node_rank",
                                **cfg.where("distributed", "node_rank")))
    for low, high in (("min_pixels", "max_pixels"), ("video_min_frames", "video_max_frames"),
                      ("video_min_frame_pixels", "video_max_frame_pixels")):
        lo, hi = getattr(cfg.data, low), getattr(cfg.data, high)
        if lo > hi:
            problems.append(Problem("error", f"{low} {lo} exceeds {high} {hi}", key=f"data.{low}",
                                    hint=f"lower {low} or raise {high}", **cfg.where("data", low)))
    for value, name in ((cfg.training.learning_rate, "learning_rate"), (cfg.training.max_grad_norm, "max_grad_norm")):
        if not math.isfinite(value):
            problems.append(Problem("error", "must be a finite number", key=f"training.{name}",
                                    **cfg.where("training", name)))
    if cfg.data.use is not None:
        from qwenvl.data.dataset_use import DatasetUseError, parse_dataset_use

        if not cfg.data.use:
            problems.append(Problem("error", "empty list: name at least one dataset, or delete the key to use all",
                                    key="data.use", **cfg.where("data", "use")))
        first_index: dict[str, int] = {}
        for index, entry in enumerate(cfg.data.use):
            try:
                if "," in entry:
                    raise DatasetUseError(f"{entry!r} holds a comma; give one dataset per list item")
                name = parse_dataset_use(entry)[0].name
                if name in first_index:
                    problems.append(Problem("error", f"dataset {name!r} is listed twice (also item "
                                            f"{first_index[name]})", key=f"data.use[{index}]",
                                            hint=f"list it once; for more copies write a percent above 100, "
                                            f"e.g. {name}%200", **cfg.where("data", "use", index)))
                first_index.setdefault(name, index)
            except DatasetUseError as exc:
                problems.append(Problem("error", str(exc), key=f"data.use[{index}]",
                                        hint="write 'name' or 'name%percent', e.g. docs%12.5",
                                        **cfg.where("data", "use", index)))
    out = cfg.output
    if out.resume not in ("auto", "never") and not out.resume.strip():
        problems.append(Problem("error", "resume must be auto, never or a checkpoint path", key="output.resume",
                                hint="e.g. resume: auto", **cfg.where("output", "resume")))
    from vlsft.training_args import check_extra  # local: keeps the name table out of plain config imports

    for name, message, hint in check_extra(tr.extra):
        problems.append(Problem("error", message, key=f"training.extra.{name}", hint=hint,
                                **cfg.where("training", "extra", name, key=True)))
    return problems


def validate_data(data: dict, marks: Marks | None = None, source: str = "<config>",
                  path: Path | None = None) -> RunConfig:
    """Validate an already-parsed mapping; raise ProblemsError with every problem found."""
    marks = marks or Marks()
    # Top-level keys starting with "x-" are free for YAML anchors (`x-common: &common {...}`), as in Compose files.
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as exc:
        found = _pydantic_problems(exc, marks, source)
        found.sort(key=lambda p: (p.file != source, p.line or 0, p.column or 0))
        raise ProblemsError(found) from None
    cfg._source = path
    cfg._marks = marks
    cfg._label = source
    problems = _semantic_problems(cfg, source)
    if any(p.is_error for p in problems):
        raise ProblemsError(problems)
    return cfg


def load_run_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run YAML. Raises ProblemsError listing every problem (file:line:col)."""
    path = Path(path)
    source = str(path)
    try:
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO or a device would block or never end
            raise ProblemsError([Problem("error", "is not a regular file (a pipe, socket or device)", file=source,
                                         hint="pass the .yaml file itself")])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProblemsError([Problem("error", "file not found", file=source,
                                     hint="copy one of configs/qwen2.5-vl-*.yaml and edit it")]) from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ProblemsError([Problem("error", f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x})", file=source,
                                     line=line, hint="save the file as UTF-8")]) from None
    except IsADirectoryError:
        raise ProblemsError([Problem("error", "is a folder, not a run YAML", file=source,
                                     hint="pass the .yaml file, e.g. configs/qwen2.5-vl-7b.yaml")]) from None
    except OSError as exc:
        raise ProblemsError([Problem("error", f"cannot read the file: {exc.strerror or exc}", file=source,
                                     hint="check the path and its permissions")]) from None
    data, marks, problems = parse_yaml_text(text, source, tuple(SECTIONS))
    if problems:
        raise ProblemsError(problems)
    problems = apply_overrides(data, marks, list(overrides))
    try:
        cfg = validate_data(data, marks, source, path.resolve())
    except ProblemsError as exc:
        raise ProblemsError(problems + exc.problems) from None
    if problems:
        raise ProblemsError(problems)
    return cfg

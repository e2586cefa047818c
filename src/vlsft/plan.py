"""The launch plan: one builder that turns a validated run YAML into exactly what will run.

``vlsft print-args`` renders a :class:`LaunchPlan`; ``vlsft train`` executes the same object. Nothing here
imports torch or transformers, writes a file or starts a process (it reads the dataset dictionary, counts
annotation records and looks at ``output.dir``).

Where each run YAML key ends up:

* ``model.*``, ``data.*`` -> the trainer's ``ModelArguments`` / ``DataArguments`` flags (official names;
  ``data.flatten`` -> ``--data_flatten``, ``data.packing`` -> ``--data_packing``, ``data.seed`` ->
  ``--data_seed``, ``data.num_workers`` -> ``--dataloader_num_workers``, ``data.use`` -> ``--dataset_use``).
* ``training.*`` -> ``transformers.TrainingArguments`` flags (``warmup_ratio`` -> ``--warmup_steps`` because
  transformers 5 reads a value below 1 as a ratio and has no ``--warmup_ratio``); ``training.extra`` is
  passed through as ``--name value``.
* ``distributed.*`` -> the torchrun options and ``--deepspeed``; ``output.*`` -> ``--output_dir``,
  ``--run_name``, ``--resume``, ``--overwrite_output_dir``.
* ``wandb.*`` and ``storage.*`` -> environment variables only (never argv).

torchrun: ``argv[0]`` is the ``torchrun`` script next to ``sys.executable`` (the venv vlsft runs in),
as an absolute path, so the launch uses the same torch/transformers install as vlsft even when another
environment is first on ``PATH``, and the printed command still works when pasted into a shell where the
venv is not activated. Only when that script is missing does the plan fall back to plain ``torchrun``.

Step arithmetic (transformers 5.24, ``dataloader_drop_last`` false): every rank receives
``ceil(N / world)`` samples (the sampler pads by repeating samples), makes ``ceil(. / per_device)``
micro-batches, and the Trainer counts ``ceil(batches / accumulation)`` optimizer steps per epoch, the last
one possibly partial. Nested ceilings of exact divisions collapse, so
``steps_per_epoch = ceil(N / (per_device x accumulation x nproc_per_node x nnodes))`` and
``total_steps = max_steps if max_steps > 0 else ceil(num_train_epochs x steps_per_epoch)``.
With ``data.packing`` a micro-batch holds packed rows of several samples, so these counts are upper
bounds (estimates).
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vlsft
from qwenvl.families import family as fam_of
from qwenvl.hub import is_hub_id
from qwenvl.prechecks import (
    deepspeed_json_problem,
    family_problems,
    lora_problems,
    model_folder_problem,
    nothing_to_train,
    precision_problem,
    report_to_problem,
    wandb_can_log_in,
    zero_stage,
)
from qwenvl.problems import Problem, ProblemsError, UserError, did_you_mean
from qwenvl.runpolicy import DEEPSPEED_PRESETS, deepspeed_path, run_markers
from qwenvl.secrets import MASK, is_secret_name, mask_url, mask_urls
from vlsft.config import RunConfig, load_run_config
from vlsft.environment import (  # noqa: F401 - re-exported: the launch environment's public names
    STORAGE_ENV,
    apply_slurm,
    check_topology,
    child_environment,
    extensions_cache,
    pytorchjob_topology,
    resolve_reference,
    storage_environment,
    storage_overrides,
    topology_source,
)
from vlsft.keymap import KEYS, yaml_value

REPO_CONFIGS = Path(vlsft.__file__).resolve().parents[2] / "configs"
IMAGE_TOKEN_PIXELS = 28 * 28  # one merged vision token per 28x28 pixels (14x14 patches, 2x2 merge)
TEXT_TOKEN_ALLOWANCE = 30  # chat-template and prompt tokens around one image, roughly
LOW_LR = 1e-6
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")



@dataclass
class DatasetShare:
    """One dataset of the mix: records in its annotation file, the percent used, samples per epoch."""

    name: str
    records: int
    percent: float
    samples: int


@dataclass
class LaunchPlan:
    """Everything ``vlsft train`` will do, computed without side effects."""

    torchrun: list[str]
    trainer_args: list[str]
    dataset_use: str
    env: dict[str, str]
    world_size: int
    effective_batch_size: int
    samples_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warnings: list[str]
    config: RunConfig
    datasets: list[DatasetShare] = field(default_factory=list)
    # evaluation: held-out shares of the training datasets (data.eval_split) and data.eval datasets; cadence
    eval_datasets: list[DatasetShare] = field(default_factory=list)
    eval_samples: int = 0
    eval_every: str | None = None  # "every 50 steps (4 times)", "every epoch"; None: no evaluation
    steps_are_estimate: bool = False
    slurm: list[str] = field(default_factory=list)  # distributed.* values taken from SLURM_* / PET_* ("key=value")
    cluster: str | None = None  # where `slurm` came from: "SLURM" or "PyTorchJob (PET_*)"
    # trainable parameters per part (qwenvl.lora.parameter_report; None when the weights cannot be read)
    trainable: dict | None = None
    # GPU memory per rank (qwenvl.memory.MemoryEstimate; None when the model folder cannot be read yet)
    memory: Any = None
    annotation_paths: dict[str, str] = field(default_factory=dict)  # dataset -> annotation file (time estimate)
    # model_type from the model folder's config.json (None before model.build_tiny builds it) and what that
    # family cannot do here (qwenvl.families.Family.limits)
    family: str | None = None
    family_limits: list[str] = field(default_factory=list)
    dataset_notes: dict[str, str] = field(default_factory=dict)  # per dataset: what the family does not do with it
    # the chat template samples are rendered as: {"template": name, "why": ..., "datasets": {name: how}}
    chat: dict[str, Any] = field(default_factory=dict)
    # model.name_or_path as a hub id: what the HF cache holds of it (qwenvl.hub.HubModel); None for a folder
    hub: Any = None
    # values that must never be shown: of secret-named variables, and reached through a secret-named ${VAR}
    secret_values: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def family_from_id(self) -> bool:
        """The family was read from the hub id's name (no config.json cached yet), not from a config.json."""
        return self.hub is not None and self.hub.config_json is None and self.family is not None

    def is_secret(self, key: str, value: str) -> bool:
        return bool(value) and (is_secret_name(key) or value in self.secret_values)

    def display_env(self) -> dict[str, str]:
        """``env`` with secret values replaced by ``***``: secret-named variables, any variable holding a
        secret's value (``storage.endpoint_url: ${AWS_SECRET_ACCESS_KEY}`` included)."""
        return {k: (MASK if self.is_secret(k, v) else mask_url(v)) for k, v in self.env.items()}

    @property
    def batch_formula(self) -> str:
        tr, dist = self.config.training, self.config.distributed
        return (f"effective batch = {tr.per_device_train_batch_size} × {tr.gradient_accumulation_steps} × "
                f"{dist.nproc_per_node} × {dist.nnodes} = {self.effective_batch_size}")

    def to_json(self) -> dict[str, Any]:
        """The ``print-args --json`` document (secrets masked, and credentials in any URL: an endpoint's
        ``user:password@``)."""
        return _masked({
            "torchrun": list(self.torchrun),
            "trainer_args": list(self.trainer_args),
            "dataset_use": self.dataset_use,
            "env": self.display_env(),
            "world_size": self.world_size,
            "effective_batch_size": self.effective_batch_size,
            "samples_per_epoch": self.samples_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "eval_samples": self.eval_samples,
            "eval_every": self.eval_every,
            "family": self.family,
            "family_limits": list(self.family_limits),
            "family_from_id": self.family_from_id,
            "model": self.hub.to_json() if self.hub is not None else None,
            "memory_gib": self.memory_json(),
            "chat": self.chat,
            "warnings": list(self.warnings),
        })

    def memory_json(self) -> dict[str, float] | None:
        if self.memory is None:
            return None
        return {**{k: round(v / 2**30, 2) for k, v in self.memory.terms.items()},
                "total": round(self.memory.total / 2**30, 2)}


# --------------------------------------------------------------------------- helpers

def _masked(value: Any) -> Any:
    """``value`` with :func:`qwenvl.secrets.mask_urls` applied to every string in it (dicts and lists walked)."""
    if isinstance(value, str):
        return mask_urls(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value


def render_value(value: Any) -> str:
    """A config value as one trainer argv token: ``True``/``False``, ``2e-05``, ``1000`` (not ``1000.0``)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value)
    if isinstance(value, dict | list):
        import json

        return json.dumps(value, separators=(",", ":"))
    return str(value)


def _resolve_path(base: Path, path: str) -> str:
    from qwenvl import storage

    if storage.is_url(path):
        return path
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p).resolve())


def _looks_local(path: str) -> bool:
    """An explicit filesystem path (as opposed to a hub id such as ``Qwen/Qwen2.5-VL-7B-Instruct``)."""
    return path.startswith(("/", "./", "../", "~")) or path in (".", "..")


def torchrun_executable() -> str:
    """``<venv>/bin/torchrun`` next to the running interpreter, else ``torchrun`` from PATH."""
    candidate = Path(sys.executable).parent / "torchrun"
    return str(candidate) if candidate.exists() else "torchrun"


def _not_a_folder(path: Path) -> Path | None:
    """The file that stands where ``path`` or one of its parents must be a folder, else None."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


_MEDIA_KEY = re.compile(rb'"(image|video)"\s*:')


def _media_kinds(path: str, limit: int = 16 << 20) -> set[str]:
    """Cheap scan of a local annotation file for ``"image":`` / ``"video":`` keys (first ``limit`` bytes)."""
    kinds: set[str] = set()
    try:
        with open(path, "rb") as f:
            tail = b""
            read = 0
            while read < limit and len(kinds) < 2:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                read += len(chunk)
                kinds.update(m.group(1).decode() for m in _MEDIA_KEY.finditer(tail + chunk))
                tail = chunk[-16:]
    except OSError:
        pass
    return kinds


# --------------------------------------------------------------------------- the builder: a table of contents

def build_plan(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Resolve ``cfg`` into a :class:`LaunchPlan`. Raises ProblemsError listing every error found.

    Each step below appends what it finds to ``problems`` (raised together at the end) and ``warnings``."""
    environ = os.environ if environ is None else environ
    cfg = _own_copy(cfg)
    problems: list[Problem] = []
    warnings: list[str] = []
    slurm = apply_slurm(cfg, environ)  # distributed.* from SLURM_* / PET_* where the YAML left them open
    cluster = topology_source(environ) if slurm else None
    check_topology(cfg, slurm, problems, warnings, cluster)
    data = _plan_data(cfg, environ, problems, warnings)
    family, hub = _plan_paths(cfg, environ, problems, warnings)
    ds_path, ds_blocks = _plan_deepspeed(cfg, problems)
    _family_rules(cfg, family, ds_path, problems)
    chat = _plan_chat(cfg, family, data, problems, warnings)
    _video_rate_rule(cfg, problems)
    _packing_rows_rule(cfg, problems)
    batch = _batch_math(cfg, data.samples)
    eval_strategy, eval_every = _plan_eval(cfg, data.eval_shares, batch.total_steps, problems)
    env = _plan_env(cfg, environ, problems, warnings)
    trainer_args = _trainer_argv(cfg, {
        "dataset_use": data.dataset_use, "deepspeed": ds_path, "gradient_accumulation_steps": batch.accumulation,
        "report_to": env.report_to, "eval_dataset_use": data.eval_use, "eval_strategy": eval_strategy,
        "per_device_eval_batch_size": cfg.training.per_device_eval_batch_size or (
            cfg.training.per_device_train_batch_size if eval_strategy not in (None, "no") else None)})
    _training_mode_rules(cfg, ds_path, problems)
    _output_is_the_model_rule(cfg, problems)
    _known_traps(cfg, data, ds_path, ds_blocks, env, warnings)
    if problems:
        raise ProblemsError(problems)
    return LaunchPlan(
        trainable=trainable_report(cfg),
        memory=memory_report(cfg, ds_path, batch.world),
        annotation_paths={s.name: str(data.dictionary.datasets[s.name].annotation_path) for s in data.shares},
        family=family,
        hub=hub,
        family_limits=fam_of(family).limits() if family else [],
        dataset_notes=_dataset_notes(family, data),
        chat=chat,
        torchrun=_launcher(cfg) + trainer_args,
        trainer_args=trainer_args,
        dataset_use=data.dataset_use,
        env=env.env,
        world_size=batch.world,
        effective_batch_size=batch.effective,
        samples_per_epoch=data.samples,
        steps_per_epoch=batch.steps_per_epoch,
        total_steps=batch.total_steps,
        warnings=warnings,
        config=cfg,
        datasets=data.shares,
        eval_datasets=data.eval_shares,
        eval_samples=sum(s.samples for s in data.eval_shares),
        eval_every=eval_every,
        steps_are_estimate=cfg.data.packing,
        slurm=slurm,
        cluster=cluster,
        secret_values=frozenset(env.secret_values),
    )


def _own_copy(cfg: RunConfig) -> RunConfig:
    """A deep copy the steps may resolve in place (paths, distributed.*), keeping the YAML positions for errors."""
    copy = cfg.model_copy(deep=True)
    copy._source, copy._marks, copy._label = cfg._source, cfg._marks, cfg._label
    return copy


# --------------------------------------------------------------------------- data

@dataclass
class _Data:
    """What :func:`_plan_data` found: the dictionary, the shares of the mix and the trainer's selections."""

    dictionary: Any
    shares: list[DatasetShare]
    eval_shares: list[DatasetShare]  # data.eval datasets, then the held-out shares (data.eval_split)
    dataset_use: str
    eval_use: str | None
    samples: int


def _plan_data(cfg: RunConfig, environ: Mapping[str, str], problems: list[Problem], warnings: list[str]) -> _Data:
    """``data.use`` / ``data.eval`` against the dictionary: records per dataset, samples per epoch and the held-out
    eval shares. Read with the run's storage.* settings applied (the dictionary may live on S3)."""
    from qwenvl.data.dataset_use import format_dataset_use, held_out_count, sample_count

    d = cfg.data
    with storage_environment(cfg, environ):
        chosen, dictionary = _select_datasets(cfg, problems)
        counts = {c.name: _record_count(c.name, dictionary.datasets[c.name], dictionary, problems) for c in chosen}
    shares: list[DatasetShare] = []
    eval_shares: list[DatasetShare] = []
    eval_use = _select_eval(cfg, dictionary, problems, eval_shares) if d.eval else None
    for name, percent in ((c.name, c.percent) for c in chosen):
        records = counts[name]
        if records is None:
            continue
        held = held_out_count(records, d.eval_split or 0.0)  # the trainer draws from the records not held out
        shares.append(DatasetShare(name, records, percent, sample_count(records - held, percent)))
        if held:
            eval_shares.append(DatasetShare(f"{name} (held out)", records, d.eval_split * 100, held))
        if shares[-1].samples == 0:
            warnings.append(f"dataset {name!r} yields 0 samples per epoch ({records} records at {percent:g} %)")
    for p in getattr(dictionary, "warnings", []):
        warnings.append(p.render())
    # each entry as the trainer resolves it back: `docs%100` stays explicit when the dictionary gives docs a rate
    dataset_use = format_dataset_use([c.entry for c in chosen if counts[c.name] is not None])
    samples = sum(s.samples for s in shares)
    if shares and samples == 0:
        problems.append(Problem("error", "the selected datasets yield no samples per epoch", key="data.use",
                                hint="raise the percents in data.use (or the dictionary's sampling_rate)",
                                **cfg.where("data", "use")))
    return _Data(dictionary, shares, eval_shares, dataset_use, eval_use, samples)


def _select_datasets(cfg: RunConfig, problems: list[Problem]) -> tuple[list[Any], Any]:
    """``data.use`` against the dictionary -> (the chosen :class:`~qwenvl.data.dataset_use.SelectedDataset` s, the
    dictionary). The trainer resolves ``--dataset_use`` with the same resolver; a YAML lists a name once."""
    from qwenvl.data.dataset_use import resolve_selection
    from qwenvl.data.dictionary import load_dictionary

    dict_path = _resolve_path(cfg.base_dir, cfg.data.dictionary)
    dictionary = load_dictionary(dict_path)
    if getattr(dictionary, "llamafactory", False):
        _spare_unused_entries(cfg, dictionary)
    if not dictionary.ok:
        if getattr(dictionary, "unusable", False):
            problems.append(Problem("error", f"cannot use the dataset dictionary {dict_path}", key="data.dictionary",
                                    hint="see the next line; relative paths start at the run YAML's folder",
                                    **cfg.where("data", "dictionary")))
        problems.extend(dictionary.errors)
        return [], dictionary
    selection = resolve_selection(cfg.data.use, {name: spec.percent for name, spec in dictionary.datasets.items()},
                                  duplicates="reject", source=dict_path)
    for p in selection.problems:
        at = ("data", "use") if p.index is None else ("data", "use", p.index)
        problems.append(Problem("error", p.message, key="data.use" if p.index is None else f"data.use[{p.index}]",
                                hint=p.hint, **cfg.where(*at)))
    return selection.datasets, dictionary


def _spare_unused_entries(cfg: RunConfig, dictionary: Any) -> None:
    """A LLaMA-Factory ``dataset_info.json`` is a catalogue (its own lists dozens of hub and alpaca datasets):
    as LLaMA-Factory does, only the entries ``data.use`` / ``data.eval`` name must be readable; the errors of the
    others become one warning."""
    names = {u.split("%", 1)[0].strip() for u in [*(cfg.data.use or []), *(cfg.data.eval or [])]}
    if not names:
        return
    spared = {p for p in dictionary.errors  # (a problem of no dataset, e.g. of the file itself, is never spared)
              if dictionary.dataset_of.get(p) is not None and dictionary.dataset_of[p] not in names}
    if not spared:
        return
    dictionary.problems = [p for p in dictionary.problems if p not in spared]
    unused = sorted({dictionary.dataset_of[p] for p in spared})
    shown = ", ".join(unused[:5]) + (f" and {len(unused) - 5} more" if len(unused) > 5 else "")
    dictionary.problems.append(Problem("warning", f"{len(unused)} dataset(s) of {dictionary.path} that data.use does "
                                       f"not name cannot be read by vlsft ({shown}): not used",
                                       hint=f"vlsft datasets check {dictionary.path} says why"))


def _select_eval(cfg: RunConfig, dictionary: Any, problems: list[Problem], shares: list[DatasetShare]) -> str | None:
    """``data.eval`` against the dictionary (the data.use grammar) -> the ``--eval_dataset_use`` string; appends one
    share per eval dataset."""
    from qwenvl.data.dataset_use import format_dataset_use, resolve_selection, sample_count

    if not getattr(dictionary, "ok", False):
        return None
    selection = resolve_selection(cfg.data.eval, {name: spec.percent for name, spec in dictionary.datasets.items()},
                                  duplicates="reject", source=str(getattr(dictionary, "path", "")))
    for p in selection.problems:
        at = ("data", "eval") if p.index is None else ("data", "eval", p.index)
        problems.append(Problem("error", p.message, key="data.eval" if p.index is None else f"data.eval[{p.index}]",
                                hint=p.hint, **cfg.where(*at)))
    entries = []
    for c in selection.datasets:
        records = _record_count(c.name, dictionary.datasets[c.name], dictionary, problems)
        if records is None:
            continue
        shares.append(DatasetShare(c.name, records, c.percent, sample_count(records, c.percent)))
        entries.append(c.entry)
    return format_dataset_use(entries) if entries else None


def _record_count(name: str, spec: Any, dictionary: Any, problems: list[Problem]) -> int | None:
    count = getattr(dictionary, "record_counts", {}).get(name)
    if count is not None:
        return int(count)
    try:
        from qwenvl.data.dictionary import count_records

        return int(count_records(spec.annotation_path))
    except (OSError, ValueError) as exc:
        if spec.length is not None:
            return int(spec.length)
        problems.append(Problem("error", f"cannot count the records of {spec.annotation_path}: {exc}", key=name,
                                file=getattr(dictionary, "path", None), hint="run `vlsft datasets check` on the "
                                "dictionary, or declare \"length\""))
        return None


# --------------------------------------------------------------------------- paths

def _plan_paths(cfg: RunConfig, environ: Mapping[str, str], problems: list[Problem],
                warnings: list[str]) -> tuple[str | None, Any]:
    """Resolve the dictionary, output.dir, the model folder and output.resume against the run YAML's folder; return
    the model's family (config.json's model_type; None when it cannot be read yet) and, for a hub id, what the HF
    cache holds of it (:func:`_plan_hub_model`)."""
    base, out = cfg.base_dir, cfg.output
    cfg.data.dictionary = _resolve_path(base, cfg.data.dictionary)
    out.dir = _resolve_path(base, out.dir)
    if "://" in out.dir:
        problems.append(Problem("error", f"output.dir {out.dir} is a URL: checkpoints are written to a local or "
                                "shared filesystem", key="output.dir", hint="use a folder such as /shared/runs/x "
                                "and copy the result to object storage afterwards", **cfg.where("output", "dir")))
    else:
        blocker = _not_a_folder(Path(out.dir))
        if blocker is not None:
            problems.append(Problem("error", f"output.dir {out.dir} cannot be a folder: {blocker} is a file",
                                    key="output.dir", hint="choose another output.dir", **cfg.where("output", "dir")))
    m = cfg.model
    if not _looks_local(m.name_or_path) and not (cfg.base_dir / m.name_or_path).is_dir() \
            and is_hub_id(m.name_or_path) and not m.build_tiny:  # build_tiny: a folder it builds
        family, hub = _plan_hub_model(cfg, environ, problems, warnings)
    else:
        family, hub = _plan_model_folder(cfg, problems, warnings), None
    if out.resume not in ("auto", "never"):
        _plan_resume_path(cfg, problems)
    return family, hub


def _plan_model_folder(cfg: RunConfig, problems: list[Problem], warnings: list[str]) -> str | None:
    """``model.name_or_path`` resolved and checked (model.build_tiny: built later by ``vlsft train``); its family."""
    m = cfg.model
    if _looks_local(m.name_or_path) or (cfg.base_dir / m.name_or_path).is_dir():
        m.name_or_path = _resolve_path(cfg.base_dir, m.name_or_path)
    if m.revision is not None:
        problems.append(Problem("error", f"model.revision {m.revision} names a hub revision, but model.name_or_path "
                                f"{m.name_or_path} is a local folder", key="model.revision", hint="remove "
                                "model.revision, or set name_or_path to a hub id such as Qwen/Qwen2.5-VL-7B-Instruct",
                                **cfg.where("model", "revision")))
    if m.build_tiny and not os.path.isfile(os.path.join(m.name_or_path, "config.json")):
        warnings.append(f"model.build_tiny: `vlsft train` builds a tiny random model in {m.name_or_path} first")
    else:
        found = model_folder_problem(m.name_or_path)
        if found:
            problems.append(Problem("error", found[0], key="model.name_or_path", hint=found[1],
                                    **cfg.where("model", "name_or_path")))
    if os.path.isfile(os.path.join(m.name_or_path, "config.json")):
        from qwenvl.families import read_model_type

        try:
            return read_model_type(m.name_or_path)
        except UserError:
            return None  # reported above
    if m.build_tiny:
        return "qwen2_5_vl"  # what model.build_tiny builds (qwenvl.tiny.ensure_tiny_model's default)
    return None


def _plan_hub_model(cfg: RunConfig, environ: Mapping[str, str], problems: list[Problem],
                    warnings: list[str]) -> tuple[str | None, Any]:
    """``model.name_or_path`` as a hub id, without a download: a cached snapshot of the revision stands in for the
    model folder (its config.json gives the family; its weights, if all there, the memory estimate); otherwise the
    id stays, and its name gives the family (qwenvl.families.family_from_hub_id). ``vlsft train`` downloads first
    (qwenvl.hub.download), so its plan always has the snapshot."""
    from qwenvl.families import family_from_hub_id, read_model_type
    from qwenvl.hub import locate

    m = cfg.model
    hub = locate(m.name_or_path, m.revision, environ)
    if hub.config_json is not None:
        m.name_or_path = hub.folder
        found = model_folder_problem(hub.folder)
        if found:
            problems.append(Problem("error", f"{hub.repo_id}: {found[0]}", key="model.name_or_path", hint=found[1],
                                    **cfg.where("model", "name_or_path")))
            return None, hub
        return read_model_type(hub.folder), hub
    fam = family_from_hub_id(hub.repo_id)
    if fam is None:
        warnings.append(f"model.name_or_path {hub.repo_id} is not a folder ({cfg.base_dir / hub.repo_id} does not "
                        f"exist), so it is read as a hub id: its family is unknown until `vlsft train` downloads its "
                        "config.json (a local folder is written as ./path or /path)")
    return (fam.model_type if fam else None), hub


def _plan_resume_path(cfg: RunConfig, problems: list[Problem]) -> None:
    """``output.resume: PATH``: relative to the run YAML's folder, else to output.dir (``checkpoint-1000``)."""
    out = cfg.output
    typed_resume = out.resume
    out.resume = _resolve_path(cfg.base_dir, typed_resume)
    inside = os.path.join(out.dir, typed_resume)  # `resume: checkpoint-1000` means the one in output.dir
    if not os.path.isdir(out.resume) and not os.path.isabs(os.path.expanduser(typed_resume)) \
            and "://" not in out.dir and os.path.isdir(inside):
        out.resume = os.path.normpath(inside)
    if "://" in out.resume:
        problems.append(Problem("error", f"checkpoint {out.resume} is a URL: resume from a local or shared "
                                "folder", key="output.resume", hint="download the checkpoint first",
                                **cfg.where("output", "resume")))
    elif not os.path.isdir(out.resume):
        problems.append(Problem("error", f"checkpoint {out.resume} not found", key="output.resume",
                                hint="a checkpoint-N folder (relative paths start at the run YAML's folder, "
                                "then at output.dir); auto resumes from the newest one in output.dir; "
                                "never starts fresh", **cfg.where("output", "resume")))


# --------------------------------------------------------------------------- DeepSpeed and the model family

def _plan_deepspeed(cfg: RunConfig, problems: list[Problem]) -> tuple[str | None, set[str]]:
    """``distributed.deepspeed`` (a preset name or a path) -> (the JSON path or None, its top-level blocks)."""
    dist = cfg.distributed
    typed = dist.deepspeed
    ds_path = deepspeed_path(typed, cfg.base_dir)
    if ds_path is None:
        dist.deepspeed = "none"
        return None, set()
    dist.deepspeed = ds_path
    if "://" not in ds_path and not os.path.isfile(ds_path):
        guess = did_you_mean(typed.lower().replace("-", "_"), DEEPSPEED_PRESETS) if "/" not in typed else None
        problems.append(Problem("error", f"DeepSpeed config {ds_path} not found", key="distributed.deepspeed",
                                hint=guess or "zero2, zero3, zero3_offload, none, or a path to a JSON file "
                                "(relative paths start at the run YAML's folder)",
                                **cfg.where("distributed", "deepspeed")))
        return ds_path, set()
    if "://" in ds_path:
        problems.append(Problem("error", f"DeepSpeed config {ds_path} must be a local file", key="distributed.deepspeed",
                                hint="copy the JSON next to the run YAML", **cfg.where("distributed", "deepspeed")))
        return ds_path, set()
    found = deepspeed_json_problem(ds_path)
    if found:
        problems.append(Problem("error", found[0], key="distributed.deepspeed", hint=found[1],
                                **cfg.where("distributed", "deepspeed")))
    return ds_path, _deepspeed_blocks(ds_path)


def _family_rules(cfg: RunConfig, family: str | None, ds_path: str | None, problems: list[Problem]) -> None:
    """What this model family cannot do with these settings (the trainer checks the same rules)."""
    if family is None:
        return
    d = cfg.data
    for key, message, hint in family_problems(
            family, data_flatten=bool(d.flatten), data_packing=bool(d.packing),
            zero_stage=zero_stage(ds_path) if ds_path is not None and "://" not in ds_path else None):
        problems.append(Problem("error", message, key=key, hint=hint, **cfg.where(*key.split("."))))


def _video_rate_rule(cfg: RunConfig, problems: list[Problem]) -> None:
    """``data.video_fps`` and ``data.base_interval`` are two spellings of the frame rate (base_interval =
    1 / video_fps); the trainer refuses a disagreement for Qwen2/2.5-VL and, for the Qwen3 families, would sample
    at video_fps and ignore base_interval."""
    d = cfg.data
    if d.video_fps is not None and "base_interval" in d.model_fields_set and d.video_fps > 0 \
            and abs(d.base_interval - 1.0 / d.video_fps) > 1e-9 * d.base_interval:
        problems.append(Problem("error", f"data.video_fps {d.video_fps:g} and data.base_interval {d.base_interval:g} "
                                f"disagree: video_fps {d.video_fps:g} means base_interval = 1 / video_fps = "
                                f"{1.0 / d.video_fps:g} seconds", key="data.video_fps",
                                hint="set only one of them (video_fps: frames per second, the official HEAD name; "
                                "base_interval: seconds between frames)", **cfg.where("data", "video_fps")))


def _packing_rows_rule(cfg: RunConfig, problems: list[Problem]) -> None:
    """``data.packing_rows`` (a token budget per step) only means something with ``data.packing``."""
    from qwenvl.data.token_budget import budget_problem

    found = budget_problem(packing=bool(cfg.data.packing), packing_rows=cfg.data.packing_rows)
    if found:
        problems.append(Problem("error", found[0], key="data.packing_rows", hint=found[1],
                                **cfg.where("data", "packing_rows")))


# --------------------------------------------------------------------------- batch arithmetic and evaluation

@dataclass
class _Batch:
    world: int
    accumulation: int
    effective: int
    steps_per_epoch: int
    total_steps: int


def _batch_math(cfg: RunConfig, samples: int) -> _Batch:
    """The step arithmetic of the module docstring."""
    tr, dist = cfg.training, cfg.distributed
    world = dist.nnodes * dist.nproc_per_node
    accum = tr.gradient_accumulation_steps or 1
    effective = tr.per_device_train_batch_size * accum * world
    steps_per_epoch = max(math.ceil(samples / effective), 1) if samples else 0
    total = tr.max_steps if tr.max_steps > 0 else math.ceil(tr.num_train_epochs * steps_per_epoch)
    return _Batch(world, accum, effective, steps_per_epoch, total)


def _plan_eval(cfg: RunConfig, eval_shares: list[DatasetShare], total: int,
               problems: list[Problem]) -> tuple[str | None, str | None]:
    """The eval strategy the trainer gets and its cadence in words (transformers: eval_steps defaults to
    logging_steps)."""
    tr, d = cfg.training, cfg.data
    eval_strategy = tr.eval_strategy if tr.eval_strategy is not None else ("steps" if eval_shares else None)
    if eval_strategy not in (None, "no") and not d.eval_split and not d.eval:
        # the trainer refuses it in every rank (qwenvl.train: "--eval_strategy ... needs eval data")
        problems.append(Problem("error", f"training.eval_strategy {eval_strategy} needs eval data, and there is none",
                                key="training.eval_strategy", hint="set data.eval_split (a held-out fraction, e.g. "
                                "0.02) or data.eval (dataset names, as data.use), or eval_strategy: no",
                                **cfg.where("training", "eval_strategy")))
    if eval_strategy == "steps":
        every = tr.eval_steps if tr.eval_steps is not None else tr.logging_steps
        n_every = math.ceil(every * total) if every < 1 else int(every)
        return eval_strategy, f"every {n_every} steps ({total // max(n_every, 1)} times)"
    if eval_strategy == "epoch":
        return eval_strategy, "every epoch"
    return eval_strategy, None


# --------------------------------------------------------------------------- environment

@dataclass
class _Env:
    env: dict[str, str]
    secret_values: set[str]
    wandb_mode: str
    report_to: str


def _plan_env(cfg: RunConfig, environ: Mapping[str, str], problems: list[Problem], warnings: list[str]) -> _Env:
    """The variables torchrun gets beyond the caller's (W&B, storage.*; never argv), the secret values among them,
    and where the trainer reports."""
    env: dict[str, str] = {}
    mode = cfg.wandb.mode_in(environ)
    env["WANDB_MODE"] = mode
    if cfg.wandb.project:
        env["WANDB_PROJECT"] = cfg.wandb.project
    if cfg.wandb.entity:
        env["WANDB_ENTITY"] = cfg.wandb.entity
    secret_values = {v for k, v in environ.items() if v and len(v) >= 4 and is_secret_name(k)}
    if mode != "disabled" and environ.get("WANDB_API_KEY"):
        env["WANDB_API_KEY"] = environ["WANDB_API_KEY"]
    for key, var in STORAGE_ENV.items():
        value = getattr(cfg.storage, key)
        if value is None:
            continue
        resolved, ref = resolve_reference(value, environ)
        if resolved is None:
            warnings.append(f"storage.{key} refers to ${{{ref}}}, which is not set in this "
                            f"environment: {var} will not be passed")
            continue
        if (ref and is_secret_name(ref)) or is_secret_name(var):
            secret_values.add(resolved)
        env[var] = resolved
    tr = cfg.training
    report_to = tr.report_to if tr.report_to is not None else ("wandb" if mode != "disabled" else "none")
    _reporting_rules(cfg, environ, mode, report_to, problems)
    return _Env(env, secret_values, mode, report_to)


def _reporting_rules(cfg: RunConfig, environ: Mapping[str, str], mode: str, report_to: str,
                     problems: list[Problem]) -> None:
    """An unknown or uninstalled integration, W&B online without a key, bf16 with fp16 (the ranks refuse each)."""
    found = report_to_problem(report_to)
    if found:
        problems.append(Problem("error", found[0], key="training.report_to", hint=found[1],
                                **cfg.where("training", "report_to")))
    elif report_to in ("wandb", "all") and mode == "online" and not wandb_can_log_in({**environ, "WANDB_MODE": mode}):
        problems.append(Problem("error", "W&B is online but no API key is set (WANDB_API_KEY, or `wandb login`)",
                                key="wandb.mode", hint="export WANDB_API_KEY, or wandb.mode: offline (sync later "
                                "with `wandb sync`), or training.report_to: none", **cfg.where("wandb")))
    found = precision_problem(cfg.training.bf16, cfg.training.extra)
    if found:
        problems.append(Problem("error", found[0], key="training.extra.fp16", hint=found[1],
                                **cfg.where("training", "extra", "fp16", key=True)))


# --------------------------------------------------------------------------- trainer arguments and the launcher

def _trainer_argv(cfg: RunConfig, computed: dict[str, Any]) -> list[str]:
    """One flag per keymap row, in its order (``computed`` values replace the YAML's own), then training.extra."""
    args: list[tuple[str, Any]] = [(k.flag, computed[k.flag] if k.flag in computed else yaml_value(cfg, k))
                                   for k in KEYS]
    args += list(cfg.training.extra.items())
    trainer_args: list[str] = []
    for name, value in args:
        if value is None or value == []:
            continue
        if isinstance(value, list):  # nargs="+" fields (training.extra.label_names: [a, b] -> --label_names a b)
            trainer_args += [f"--{name}", *(render_value(v) for v in value)]
        else:
            trainer_args += _flag(name, render_value(value))
    return trainer_args


def _flag(name: str, text: str) -> list[str]:
    """``--name value``; ``--name=value`` for a value argparse would read as an option (a dataset or run name
    starting with '-'; a negative number is read as a value)."""
    if text.startswith("-"):
        try:
            float(text)
        except ValueError:
            return [f"--{name}={text}"]
    return [f"--{name}", text]


def _launcher(cfg: RunConfig) -> list[str]:
    """The torchrun part of the command (the trainer's arguments follow it)."""
    dist = cfg.distributed
    launcher = [torchrun_executable(), "--nnodes", str(dist.nnodes), "--nproc_per_node", str(dist.nproc_per_node)]
    if dist.rdzv_endpoint:
        launcher += ["--rdzv_backend", "c10d", *_flag("rdzv_endpoint", dist.rdzv_endpoint),
                     *_flag("rdzv_id", cfg.output.run_name or "vlsft")]
    elif dist.nnodes == 1 and not {"master_addr", "master_port"} & dist.model_fields_set:
        launcher += ["--standalone"]  # one machine, no port chosen: a free one, never 29500 twice on one machine
    else:
        launcher += ["--node_rank", str(dist.node_rank), "--master_addr", dist.master_addr or "127.0.0.1",
                     "--master_port", str(dist.master_port)]
    return launcher + ["-m", "qwenvl.train"]


# --------------------------------------------------------------------------- the training mode and known traps

def _training_mode_rules(cfg: RunConfig, ds_path: str | None, problems: list[Problem]) -> None:
    """LoRA settings the ranks would refuse (targets, target_modules against the model, QLoRA), quantize without
    LoRA, and nothing to train."""
    m = cfg.model
    if m.lora.enabled:
        for key, message, hint in lora_problems(
                tune_mm_vision=m.tune_mm_vision, tune_mm_mlp=m.tune_mm_mlp, tune_mm_llm=m.tune_mm_llm,
                targets=m.lora.targets, target_modules=m.lora.target_modules, quantize=m.lora.quantize,
                deepspeed=ds_path is not None):
            problems.append(Problem("error", message, key=key, hint=hint, **cfg.where(*key.split("."))))
        if m.lora.target_modules:
            _target_modules_rule(cfg, problems)
    elif m.lora.quantize is not None:
        problems.append(Problem("error", f"model.lora.quantize is {m.lora.quantize} but model.lora.enabled is false: "
                                "quantization is for LoRA (QLoRA) and would otherwise be ignored, leaving a full "
                                "fine-tune", key="model.lora.quantize", hint="set model.lora.enabled: true for "
                                "QLoRA, or remove model.lora.quantize for a full fine-tune",
                                **cfg.where("model", "lora", "quantize")))
    elif nothing_to_train(tune_mm_vision=m.tune_mm_vision, tune_mm_mlp=m.tune_mm_mlp, tune_mm_llm=m.tune_mm_llm,
                          lora=False):
        problems.append(Problem("error", "nothing is trainable: model.tune_mm_vision, tune_mm_mlp and tune_mm_llm are "
                                "all false", key="model", hint="the recipes use tune_mm_mlp: true, tune_mm_llm: true",
                                **cfg.where("model")))


def _target_modules_rule(cfg: RunConfig, problems: list[Problem]) -> None:
    """``model.lora.target_modules`` resolved against the model's module names (safetensors headers, no torch)."""
    from qwenvl.lora_rules import LoraConfigError, resolve_targets, target_modules_problem

    m = cfg.model
    try:
        lora_plan = resolve_targets(tune_mm_vision=m.tune_mm_vision, tune_mm_mlp=m.tune_mm_mlp,
                                    tune_mm_llm=m.tune_mm_llm, targets=m.lora.targets,
                                    target_modules=m.lora.target_modules)
    except LoraConfigError:
        return  # reported by lora_problems
    found = target_modules_problem(m.name_or_path, lora_plan)
    if found:
        problems.append(Problem("error", found[0], key="model.lora.target_modules", hint=found[1],
                                **cfg.where("model", "lora", "target_modules")))


def _known_traps(cfg: RunConfig, data: _Data, ds_path: str | None, ds_blocks: set[str], env: _Env,
                 warnings: list[str]) -> None:
    """Settings that run but likely not as meant (warnings only)."""
    m, d, tr = cfg.model, cfg.data, cfg.training
    attn = m.attn_implementation
    if attn is not None and attn not in ATTN_IMPLEMENTATIONS and "/" not in attn and "|" not in attn:  # hub kernels, paged|..
        guess = did_you_mean(attn, ATTN_IMPLEMENTATIONS)
        warnings.append(f"model.attn_implementation {attn!r} is not one transformers knows ("
                        + ", ".join(ATTN_IMPLEMENTATIONS) + ")" + (f"; {guess}" if guess else ""))
    if tr.learning_rate <= LOW_LR:
        warnings.append(f"training.learning_rate {tr.learning_rate:g} is tiny: the official scripts' 2e-7 barely "
                        "moves the loss on a new task (official issues #1298, #1646); start from 1e-5 to 2e-5")
    if tr.vision_tower_lr is not None and not m.tune_mm_vision:
        warnings.append("training.vision_tower_lr is set but model.tune_mm_vision is false: the vision tower is "
                        "frozen, so this learning rate is unused")
    if tr.mm_projector_lr is not None and not m.tune_mm_mlp:
        warnings.append("training.mm_projector_lr is set but model.tune_mm_mlp is false: the merger is frozen, "
                        "so this learning rate is unused")
    if m.tune_mm_vision and data.shares:
        kinds: set[str] = set()
        for s in data.shares:
            path = data.dictionary.datasets[s.name].annotation_path
            if "://" not in path:
                kinds |= _media_kinds(path)
        if kinds >= {"image", "video"}:
            warnings.append("model.tune_mm_vision is true while the data mixes images and videos: the official "
                            "README advises tune_mm_vision: false for image+video training")
    image_tokens = d.max_pixels // IMAGE_TOKEN_PIXELS
    if d.model_max_length < image_tokens + TEXT_TOKEN_ALLOWANCE:
        warnings.append(f"data.model_max_length {d.model_max_length} is below the {image_tokens} tokens one image "
                        f"may take at max_pixels {d.max_pixels} (+~{TEXT_TOKEN_ALLOWANCE} text tokens): samples "
                        "with a large image will be skipped; raise model_max_length or lower max_pixels")
    _earlier_run_trap(cfg, warnings)
    if ds_blocks & {"optimizer"} and (tr.mm_projector_lr is not None or tr.vision_tower_lr is not None):
        warnings.append(f"{ds_path} defines its own optimizer: DeepSpeed builds it, so mm_projector_lr / "
                        "vision_tower_lr groups are ignored")
    if "scheduler" in ds_blocks:
        warnings.append(f"{ds_path} defines its own scheduler: it replaces training.lr_scheduler_type "
                        f"({tr.lr_scheduler_type})")
    mode, report_to = env.wandb_mode, env.report_to
    if mode == "disabled" and report_to in ("wandb", "all"):
        warnings.append(f"training.report_to is {report_to!r} but W&B is disabled (WANDB_MODE=disabled): nothing "
                        "reaches W&B; set wandb.project (online) or wandb.mode: offline")
    if mode != "disabled" and report_to not in ("wandb", "all"):
        warnings.append(f"the wandb section is enabled ({mode}) but training.report_to is {report_to!r}")
    if d.packing:
        warnings.append("data.packing is on: several samples share one row, so steps per epoch are an upper-bound "
                        "estimate")


def _output_is_the_model_rule(cfg: RunConfig, problems: list[Problem]) -> None:
    """output.dir is the folder of the model trained from: the final save would write over its weights."""
    from qwenvl.prechecks import same_folder

    if same_folder(cfg.output.dir, cfg.model.name_or_path):
        problems.append(Problem("error", f"output.dir {cfg.output.dir} is the model folder the run starts from: "
                                "the final save would write over its weights and config", key="output.dir",
                                hint="choose a new output.dir (e.g. runs/<name>); the model folder is only read",
                                **cfg.where("output", "dir")))
    elif cfg.output.overwrite and _inside(cfg.model.name_or_path, cfg.output.dir):
        problems.append(Problem("error", f"model.name_or_path {cfg.model.name_or_path} is inside output.dir "
                                f"{cfg.output.dir}, whose earlier run output.overwrite sets aside (superseded-<time>/) "
                                "before the model loads", key="output.overwrite",
                                hint="start from a copy of that model outside output.dir, or train into a new "
                                "output.dir", **cfg.where("output", "overwrite")))


def _inside(path: str, folder: str) -> bool:
    """Whether the existing local ``path`` lies inside the existing local ``folder`` (links resolved)."""
    if "://" in str(path) or "://" in str(folder) or not os.path.exists(path) or not os.path.isdir(folder):
        return False
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p != f and os.path.commonpath([p, f]) == f


def _earlier_run_trap(cfg: RunConfig, warnings: list[str]) -> None:
    """output.dir already holds a run: the trainer refuses a fresh start there, or resume auto continues it."""
    out = cfg.output
    if "://" in out.dir:
        return
    markers = run_markers(out.dir)
    if markers and out.resume == "never" and not out.overwrite:
        warnings.append(f"output.dir {out.dir} already holds a run ({', '.join(markers[:3])}) while "
                        "output.resume is never and output.overwrite is false: the trainer will refuse to "
                        "start; use a new output.dir for a fresh run (or resume: auto, or overwrite: true)")
    elif markers and out.resume == "auto" and any(x.startswith("checkpoint-") for x in markers):
        newest = [x for x in markers if x.startswith("checkpoint-")][-1]
        if out.overwrite:
            warnings.append(f"output.overwrite is true but output.resume is auto and output.dir {out.dir} holds "
                            f"{newest}: the run continues it and overwrite does nothing; set output.resume: never "
                            "for a fresh start there")
        else:
            warnings.append(f"output.dir {out.dir} already holds {newest}: resume auto continues that run; use a "
                            "new output.dir for a fresh run")


def _plan_chat(cfg: RunConfig, family: str | None, data: _Data, problems: list[Problem],
               warnings: list[str]) -> dict[str, Any]:
    """The chat template the samples are rendered as (model.chat_template, else the model folder's template, else the
    family's; :func:`qwenvl.templates.resolve`, as the trainer's sample builder) and per dataset how: thinking kept or
    dropped, trained or masked, Qwen3.8's reasoning_effort (:func:`qwenvl.templates.describe`)."""
    from qwenvl import templates

    if family is None:
        return {}
    default, text = fam_of(family).chat_template, templates.folder_template(cfg.model.name_or_path)
    try:
        name, why = templates.resolve(default, cfg.model.chat_template, text)
    except ValueError:
        allowed = templates.choices(default)
        problems.append(Problem("error", f"model.chat_template {cfg.model.chat_template!r} is not a chat template "
                                f"{fam_of(family).title} can be trained with", key="model.chat_template",
                                hint=did_you_mean(str(cfg.model.chat_template), allowed) or
                                f"one of: {', '.join(allowed)}", **cfg.where("model", "chat_template")))
        return {}
    allowed = templates.choices(default)
    if text and cfg.model.chat_template is None and len(allowed) > 1 and templates.rendering_of(text) is None:
        warnings.append(f"{cfg.model.name_or_path}: its chat template is not one vlsft knows (neither a published "
                        f"text nor recognised by its features): samples are rendered as "
                        f"{templates.RENDERINGS[name].title}'s; set model.chat_template ({', '.join(allowed)}) if "
                        "the model was trained with another")
    specs = data.dictionary.datasets if data.dictionary is not None else {}
    shown = {s.name: templates.describe(name, specs[s.name].format_spec) for s in [*data.shares, *data.eval_shares]
             if s.name in specs}
    return {"template": name, "why": why, "datasets": shown}


def _dataset_notes(family: str | None, data: _Data) -> dict[str, str]:
    """Per dataset: what the family does not do with it (the official pre-packed bins of a family that cannot
    pack are read one sample per padded row)."""
    notes: dict[str, str] = {}
    if family and fam_of(family).batching_problem(data_flatten=False, data_packing=True):
        for s in data.shares:
            path = data.dictionary.datasets[s.name].annotation_path
            if "://" not in path and _prepacked(path):
                notes[s.name] = f"pre-packed bins read as single samples, one per padded row ({family} " \
                                "cannot pack here)"
    return notes



def trainable_report(cfg: RunConfig) -> dict | None:
    """Trainable parameters per part (full and LoRA) from the model folder's safetensors headers (no torch), or
    None when the folder has no readable weights yet (e.g. model.build_tiny before the build)."""
    from qwenvl.lora_rules import parameter_report, resolve_targets

    m = cfg.model
    tune = {"vision": m.tune_mm_vision, "merger": m.tune_mm_mlp, "llm": m.tune_mm_llm}
    plan = (resolve_targets(tune_mm_vision=m.tune_mm_vision, tune_mm_mlp=m.tune_mm_mlp, tune_mm_llm=m.tune_mm_llm,
                            targets=m.lora.targets, target_modules=m.lora.target_modules)
            if m.lora.enabled else None)
    try:
        return parameter_report(m.name_or_path, plan=plan, tune=tune, r=m.lora.r, use_dora=m.lora.use_dora)
    except (OSError, ValueError, KeyError):
        return None


def memory_report(cfg: RunConfig, ds_path: str | None, world: int):
    """GPU memory per rank (:func:`qwenvl.memory.estimate`) for this run, or None when the model folder has no
    readable weights or config yet. Rows: the longest the data can make (``model_max_length`` per sample, or
    ``packing_rows`` rows of it); images: one at ``max_pixels`` per sample."""
    from qwenvl import memory
    from qwenvl.lora_rules import resolve_targets
    from qwenvl.prechecks import zero_stage

    m, d, tr = cfg.model, cfg.data, cfg.training
    stage = zero_stage(ds_path) if ds_path and "://" not in ds_path else None
    offload = _offload(ds_path) if stage is not None else set()
    samples = tr.per_device_train_batch_size
    rows = d.packing_rows if d.packing and d.packing_rows else samples
    patch = 14 if not os.path.isfile(os.path.join(m.name_or_path, "config.json")) else _patch_size(m.name_or_path)
    setup = memory.Setup(
        bytes_per_value=2 if (tr.bf16 or tr.extra.get("fp16") in (True, "true", "True")) else 4,
        zero_stage=stage, offload_optimizer="optimizer" in offload, offload_param="param" in offload,
        world_size=world, quantize=m.lora.quantize if m.lora.enabled and m.lora.quantize not in (None, "none") else None,
        tokens=rows * d.model_max_length, image_patches=samples * (d.max_pixels // (patch * patch)),
        checkpointing=bool(tr.gradient_checkpointing), vision_trains=bool(m.tune_mm_vision))
    tune = {"vision": m.tune_mm_vision, "merger": m.tune_mm_mlp, "llm": m.tune_mm_llm}
    try:
        lora = (resolve_targets(tune_mm_vision=m.tune_mm_vision, tune_mm_mlp=m.tune_mm_mlp, tune_mm_llm=m.tune_mm_llm,
                                targets=m.lora.targets, target_modules=m.lora.target_modules)
                if m.lora.enabled else None)
        return memory.estimate(m.name_or_path, setup=setup, tune=tune, lora=lora, r=m.lora.r,
                               use_dora=m.lora.use_dora)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _patch_size(model_dir: str) -> int:
    import json

    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            vision = json.load(f).get("vision_config") or {}
        return int(vision.get("patch_size") or 14)
    except (OSError, ValueError, TypeError):
        return 14


def _offload(ds_path: str) -> set[str]:
    """What a DeepSpeed JSON offloads to the CPU: ``optimizer`` and/or ``param``."""
    import json

    try:
        with open(ds_path, encoding="utf-8") as f:
            zero = json.load(f).get("zero_optimization") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    return {k for k in ("optimizer", "param")
            if str((zero.get(f"offload_{k}") or {}).get("device", "none")).lower() == "cpu"}


def _prepacked(path: str) -> bool:
    """A .json annotation file in the official pre-packed format (a list whose first item is a list)."""
    if not path.endswith(".json"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError:
        return False
    return head[:1] == b"[" and head[1:].lstrip()[:1] == b"["


def _deepspeed_blocks(path: str) -> set[str]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def plan_from_file(path: str | Path, overrides: list[str] | tuple[str, ...] = (),
                   environ: Mapping[str, str] | None = None) -> LaunchPlan:
    """Load a run YAML (+ overrides) and build its plan; raises ProblemsError."""
    return build_plan(load_run_config(path, overrides), environ)

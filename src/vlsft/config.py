"""The run YAML: one typed file that says what to train, on what, how, and where to write.

```yaml
model:   {name_or_path: /models/Qwen2.5-VL-7B-Instruct, tune_mm_mlp: true, tune_mm_llm: true}
data:    {dictionary: Dataset-Dictionary.json, use: [docs%50, charts]}
training: {learning_rate: 2.0e-5, per_device_train_batch_size: 4, gradient_accumulation_steps: 4}
distributed: {nproc_per_node: 8, deepspeed: zero3}
output:  {dir: runs/first-try}
```

Load it with :func:`load_run_config` (file + dotted ``KEY=VALUE`` overrides). Every problem (YAML
syntax, unknown key with a did-you-mean, wrong type, inconsistent batch settings, a literal secret) is
reported as a :class:`qwenvl.problems.Problem` carrying ``file:line:column``; the loader raises
:class:`qwenvl.problems.ProblemsError` with all of them. No torch, no transformers.

Defaults follow the official trainer (``transformers.TrainingArguments`` 5.24 and the official
``DataArguments``/``ModelArguments``); the shipped ``configs/qwen2.5-vl-*.yaml`` carry the recipe values.
Relative paths resolve against the YAML file's folder (see :mod:`vlsft.plan`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator

from qwenvl.problems import Problem, ProblemsError, did_you_mean

ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")

# Values accepted by transformers' SchedulerType (5.24); tests/test_config.py compares with transformers.
LR_SCHEDULER_TYPES = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
    "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
    "warmup_stable_decay", "greedy",
)


def _numeric_only(annotation: Any) -> bool:
    """True when a field takes numbers but not booleans (``int``, ``float``, ``int | None``, ...)."""
    import typing

    args = set(typing.get_args(annotation)) or {annotation}
    return bool(args & {int, float}) and bool not in args


def _text_only(annotation: Any) -> bool:
    import typing

    args = set(typing.get_args(annotation)) or {annotation}
    return str in args and args <= {str, type(None)}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=False,
                              allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `learning_rate: true` as 1.0 and `batch: false` as 0: refuse it.
        if isinstance(value, bool) and info.field_name is not None:
            field_info = cls.model_fields.get(info.field_name)
            if field_info is not None and _numeric_only(field_info.annotation):
                raise ValueError(f"expected a number, got {str(value).lower()} (YAML reads true/false/yes/no/"
                                 "on/off as booleans)")
            if field_info is not None and _text_only(field_info.annotation):
                raise ValueError(f"expected text, got the boolean {str(value).lower()} (YAML reads unquoted "
                                 "yes/no/on/off/true/false as booleans): put the text in quotes, e.g. 'no'")
        return value


class ModelSection(_Section):
    """Which model to start from and which of its parts to train."""

    name_or_path: str = Field(description="Local directory of the model to fine-tune (Qwen2-VL, Qwen2.5-VL or "
                              "Qwen3-VL; the family is read from its config.json). Relative paths resolve against "
                              "the YAML folder. A hub id only works where the hub is reachable.")
    tune_mm_vision: bool = Field(False, description="Train the vision transformer (ViT) blocks. The official "
                                 "README advises false when training on image and video data together.")
    tune_mm_mlp: bool = Field(False, description="Train the vision-language merger (projector).")
    tune_mm_llm: bool = Field(False, description="Train the language model and lm_head.")
    attn_implementation: str | None = Field(None, description="Attention kernel: sdpa, eager, "
                                            "flash_attention_2, ... (default: the best available).")
    build_tiny: bool = Field(False, description="Demo/tests only: when name_or_path does not exist yet, `vlsft train` "
                             "first builds a tiny random Qwen2.5-VL there (real Qwen tokenizer, no download).")


class DataSection(_Section):
    """What to train on and how samples become tokens and pixels."""

    dictionary: str = Field(description="Path (or s3:// URL) of the dataset dictionary JSON "
                            "(name -> data_path, annotation_path, length, sampling_rate | repeat_time). "
                            "Relative paths resolve against the YAML folder.")
    use: list[str] | None = Field(None, description="Datasets to train on, as names or 'name%percent' "
                                  "('docs%50', 'charts%250' = 2.5 copies). Default: every dataset in the "
                                  "dictionary at its own sampling_rate / repeat_time. A comma string and a "
                                  "mapping {docs: 50, charts: null} are accepted too.")
    max_pixels: int = Field(576 * 28 * 28, gt=0, description="Image pixel budget (H*W after resize); one image "
                            "costs up to max_pixels / 784 tokens (100352 -> 128, 50176 -> 64).")
    min_pixels: int = Field(16 * 28 * 28, gt=0, description="Image pixel floor (H*W after resize).")
    video_max_frames: int = Field(8, gt=0, description="Most frames sampled from one video.")
    video_min_frames: int = Field(4, gt=0, description="Fewest frames sampled from one video.")
    base_interval: float = Field(2, gt=0, description="Seconds between sampled video frames.")
    video_max_frame_pixels: int = Field(32 * 28 * 28, gt=0, description="Per-frame pixel budget for videos.")
    video_min_frame_pixels: int = Field(4 * 28 * 28, gt=0, description="Per-frame pixel floor for videos.")
    model_max_length: int = Field(8192, gt=0, description="Longest token sequence per sample (or per packed "
                                  "row). Longer samples are skipped and counted; vision tokens are never cut.")
    flatten: bool = Field(False, description="Concatenate each per-device batch into one row without padding "
                          "(varlen attention); trainer flag --data_flatten.")
    packing: bool = Field(False, description="Pack samples online into rows of at most model_max_length tokens; "
                          "trainer flag --data_packing. Step counts become estimates.")
    seed: int = Field(42, description="Seed of the dataset sampling ('name%percent' subsets) and of the data "
                      "order; the same on every rank. Trainer flag --data_seed.")
    max_bad_sample_ratio: float = Field(0.01, ge=0, le=1, description="Fail the run when more than this "
                                        "fraction of the samples read so far were broken (skipped).")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank "
                             "(--dataloader_num_workers; the official scripts use 4).")

    @field_validator("use", mode="before")
    @classmethod
    def _split_comma_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        if isinstance(value, dict):  # use: {docs: 50, charts: null} -> [docs%50, charts]
            return [str(k) if v is None else f"{k}%{v}" for k, v in value.items()]
        if isinstance(value, list):
            return [part.strip() if isinstance(part, str) else part for part in value]
        return value


class TrainingSection(_Section):
    """Optimiser, schedule, batch and checkpointing (transformers.TrainingArguments names)."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate. The official scripts' 2e-7 barely "
                                 "moves a new task; 1e-5 to 2e-5 is a good start for full fine-tuning.")
    mm_projector_lr: float | None = Field(None, gt=0, description="Learning rate of the merger (projector); "
                                          "default: learning_rate.")
    vision_tower_lr: float | None = Field(None, gt=0, description="Learning rate of the vision tower; "
                                          "default: learning_rate. Only used when model.tune_mm_vision is true.")
    per_device_train_batch_size: int = Field(8, ge=1, description="Samples per GPU per forward pass "
                                             "(packed rows when data.packing is true).")
    gradient_accumulation_steps: int | None = Field(None, ge=1, description="Forward passes per optimizer "
                                                    "step. Default 1, or solved from global_batch_size.")
    global_batch_size: int | None = Field(None, ge=1, description="Samples per optimizer step over all GPUs; "
                                          "solved into gradient_accumulation_steps = global / (per_device x "
                                          "nproc_per_node x nnodes), which must divide exactly.")
    num_train_epochs: float = Field(3.0, ge=0, description="Passes over the sampled data (fractions allowed; "
                                    "0 only together with max_steps > 0).")
    max_steps: int = Field(-1, description="Total optimizer steps; > 0 overrides num_train_epochs (0 or -1: "
                           "use num_train_epochs).")
    bf16: bool = Field(False, description="Train in bfloat16 mixed precision (the recipes use true on GPUs).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass to "
                                         "save memory.")
    save_steps: float = Field(500, gt=0, description="Save a checkpoint every N optimizer steps (a value "
                              "below 1 is a fraction of the total steps).")
    save_total_limit: int | None = Field(None, ge=1, description="Keep at most this many checkpoints "
                                         "(oldest deleted first); default: keep all.")
    logging_steps: float = Field(500, gt=0, description="Log every N optimizer steps (below 1: a fraction "
                                 "of the total steps).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the total steps spent warming the "
                                "learning rate up from 0 (passed as --warmup_steps, which transformers 5 "
                                "reads as a ratio when below 1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: str = Field("linear", description="Learning-rate schedule: "
                                   + ", ".join(LR_SCHEDULER_TYPES) + ".")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables clipping).")
    seed: int = Field(42, description="Seed of model initialisation and training randomness (--seed).")
    report_to: str | None = Field(None, description="Logger for --report_to (wandb, tensorboard, none, ...; "
                                  "transformers takes one name on the command line). Default: wandb when the "
                                  "wandb section is enabled, else none.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Any other transformers.TrainingArguments "
                                  "name -> value, passed as --name value (e.g. {optim: adamw_torch_fused}).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_reporter(cls, value: Any) -> Any:
        if isinstance(value, list):
            if len(value) == 1 and isinstance(value[0], str):
                return value[0]
            raise ValueError("transformers takes one --report_to name on the command line (or all / none), "
                             f"got a list of {len(value)}")
        return value

    @field_validator("extra", mode="before")
    @classmethod
    def _empty_extra(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("lr_scheduler_type")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in LR_SCHEDULER_TYPES:
            hint = did_you_mean(value, LR_SCHEDULER_TYPES)
            raise ValueError(f"unknown scheduler {value!r}; " + (hint or "choose one of " + ", ".join(LR_SCHEDULER_TYPES)))
        return value


class DistributedSection(_Section):
    """How many processes on how many machines, and the DeepSpeed configuration."""

    nnodes: int = Field(1, ge=1, description="Number of machines.")
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per machine.")
    node_rank: int = Field(0, ge=0, description="This machine's index, 0 .. nnodes-1 (usually an override: "
                           "distributed.node_rank=1).")
    master_addr: str | None = Field(None, description="Address (host name or IP) of the rank-0 machine. Default "
                                    "127.0.0.1 on one machine; required when nnodes > 1 unless SLURM supplies it "
                                    "(first host of SLURM_JOB_NODELIST) or rdzv_endpoint is set.")
    master_port: int = Field(29500, ge=1, le=65535, description="Free TCP port on the rank-0 machine.")
    rdzv_endpoint: str | None = Field(None, description="host:port of a c10d rendezvous; when set it replaces "
                                      "node_rank/master_addr/master_port (elastic launch, e.g. on SLURM).")
    deepspeed: str = Field("zero3", description="zero2 | zero3 | zero3_offload (the JSON files shipped in "
                           "configs/), a path to your own DeepSpeed JSON, or none (plain DDP).")

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _deepspeed_off(cls, value: Any) -> Any:
        if value is None or value is False:  # `deepspeed:` (empty) / `deepspeed: false` / `off` / `no`
            return "none"
        if value is True:
            raise ValueError("true is not a DeepSpeed configuration; write zero2, zero3, zero3_offload, none or "
                             "a path to a JSON file")
        if isinstance(value, str) and value.strip().lower() in ("", "none", "off", "false", "no"):
            return "none"
        return value.strip() if isinstance(value, str) else value

    @field_validator("master_addr", "rdzv_endpoint", mode="before")
    @classmethod
    def _no_blank_address(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            return value or None
        return value

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"rdzv_endpoint {value!r} must be host:port with a port from 1 to 65535, "
                             "e.g. node01:29400")
        return value


class OutputSection(_Section):
    """Where checkpoints go, and whether to resume."""

    dir: str = Field(description="Output directory (checkpoints, final model, logs). Relative paths resolve "
                     "against the YAML folder. Use a new directory for every fresh run.")
    run_name: str | None = Field(None, description="Run name shown in logs and W&B (--run_name).")
    resume: str = Field("auto", description="auto: continue from the newest checkpoint in dir if any; never: "
                        "start fresh; or a checkpoint directory to resume from.")

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_word(cls, value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            raise ValueError("resume must be auto, never or a checkpoint path, got "
                             + ("null" if value is None else str(value).lower())
                             + " (YAML reads false/no/off as a boolean: write never)")
        if isinstance(value, str) and value.strip().lower() in ("auto", "never"):
            return value.strip().lower()
        return value
    overwrite: bool = Field(False, description="Allow a fresh start (resume never) in a dir that already holds "
                            "a run (--overwrite_output_dir).")


class WandbSection(_Section):
    """Weights & Biases logging. The API key comes only from the WANDB_API_KEY environment variable."""

    project: str | None = Field(None, description="W&B project (WANDB_PROJECT).")
    entity: str | None = Field(None, description="W&B team or user (WANDB_ENTITY).")
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description="online | offline (no network;"
                                                                 " sync later) | disabled. Default: online when "
                                                                 "project is set, else disabled.")

    @property
    def effective_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "online" if self.project else "disabled"


class StorageSection(_Section):
    """Object storage (S3 / Ceph RGW / MinIO) for s3:// paths. Reaches the trainer as AWS_* variables only."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. https://rgw.example.com "
                                     "(AWS_ENDPOINT_URL). May be a ${VAR} reference.")
    region: str | None = Field(None, description="Region (AWS_DEFAULT_REGION).")
    addressing_style: Literal["auto", "path", "virtual"] | None = Field(
        None, description="auto | path | virtual (VLSFT_S3_ADDRESSING_STYLE); Ceph usually needs path.")
    profile: str | None = Field(None, description="Profile in ~/.aws/credentials (AWS_PROFILE).")
    access_key_id: str | None = Field(None, description="Only a ${ENV_VAR} reference, e.g. ${AWS_ACCESS_KEY_ID} "
                                      "(AWS_ACCESS_KEY_ID). Literal secrets are rejected.")
    secret_access_key: str | None = Field(None, description="Only a ${ENV_VAR} reference (AWS_SECRET_ACCESS_KEY). "
                                          "Literal secrets are rejected.")
    session_token: str | None = Field(None, description="Only a ${ENV_VAR} reference (AWS_SESSION_TOKEN). "
                                      "Literal secrets are rejected.")

    @field_validator(*SECRET_FIELDS)
    @classmethod
    def _reference_only(cls, value: str | None) -> str | None:
        if value is not None and not ENV_REF.match(value.strip()):
            # Never echo the value: it may be a real secret (a variable *name* is safe to repeat).
            bare = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", value.strip())
            default = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?[-=].*\}", value.strip(), re.S)
            if bare:
                raise ValueError(f"write the reference as \"${{{bare.group(1)}}}\" (with braces, quoted); "
                                 "a bare $NAME is not expanded")
            if default:
                raise ValueError(f"a default value in a secret reference would be a literal secret in the file; "
                                 f"write \"${{{default.group(1)}}}\" and export the variable")
            raise ValueError("a literal secret is not allowed in a run YAML; use ${ENV_VAR} (e.g. "
                             "\"${AWS_SECRET_ACCESS_KEY}\") and export the variable")
        return value.strip() if value is not None else None


class RunConfig(_Section):
    """A whole run: model, data, training, distributed launch, output, W&B and storage."""

    model: ModelSection = Field(description="Model to start from and which parts to train.")
    data: DataSection = Field(description="Dataset dictionary, dataset selection and preprocessing.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Optimisation settings.")
    distributed: DistributedSection = Field(default_factory=DistributedSection, description="Launch topology "
                                            "and DeepSpeed.")
    output: OutputSection = Field(description="Output directory and resume behaviour.")
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases logging.")
    storage: StorageSection = Field(default_factory=StorageSection, description="Object storage settings.")

    @field_validator("*", mode="before")
    @classmethod
    def _empty_section(cls, value: Any) -> Any:
        # `wandb:` with every key commented out is an empty section, not an error (required keys inside
        # model/data/output are then reported as missing, with an example).
        return {} if value is None else value

    _source: Path | None = PrivateAttr(default=None)
    _marks: dict = PrivateAttr(default_factory=dict)
    _label: str | None = PrivateAttr(default=None)  # the path as the user typed it (for messages)

    @property
    def source(self) -> Path | None:
        """The YAML file this config came from (None when built in code)."""
        return self._source

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths resolve against."""
        return self._source.parent if self._source is not None else Path.cwd()

    @property
    def world_size(self) -> int:
        return self.distributed.nnodes * self.distributed.nproc_per_node

    def where(self, *path: str | int, key: bool = False) -> dict:
        """``file``/``line``/``column`` kwargs for a :class:`Problem` about the value (or key) at ``path``."""
        return _location(self._marks, self._source_name(), tuple(path), key_mark=key)

    def _source_name(self) -> str:
        if self._label is not None:
            return self._label
        return str(self._source) if self._source is not None else "<config>"

    def to_saveable_yaml(self) -> str:
        """The resolved config as YAML, safe to store next to checkpoints.

        Storage secrets are only ever ``${VAR}`` references in a RunConfig (literals are rejected at load
        time), and resolved secret values live only in the launch plan's environment, never here.
        """
        data = self.model_dump(mode="json")
        header = "# vlsft resolved run config (secrets appear only as ${VAR} references)\n"
        return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


SECTIONS: dict[str, type[_Section]] = {
    name: info.annotation for name, info in RunConfig.model_fields.items()  # type: ignore[misc]
}


# --------------------------------------------------------------------------- YAML with line numbers

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``2e-5`` as numbers (PyYAML reads them as strings)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class _Mark:
    line: int | None
    column: int | None
    origin: str | None = None  # an override "KEY=VALUE" when the value came from the command line


@dataclass
class _Marks:
    key: dict[tuple, _Mark] = field(default_factory=dict)
    value: dict[tuple, _Mark] = field(default_factory=dict)


def _location(marks: dict | _Marks, source: str, path: tuple, key_mark: bool) -> dict:
    if not isinstance(marks, _Marks):
        return {"file": source}
    table = marks.key if key_mark else marks.value
    probe = path
    while probe:
        mark = table.get(probe) or marks.key.get(probe)
        if mark is not None:
            if mark.origin is not None:
                return {"file": f"override '{mark.origin}'"}
            return {"file": source, "line": mark.line, "column": mark.column}
        probe = probe[:-1]
    return {"file": source, "line": 1 if table else None, "column": 1 if table else None}


def _walk(node: yaml.Node, path: tuple, marks: _Marks, problems: list[Problem], source: str,
          seen_nodes: set[int] | None = None) -> None:
    # An alias (*name) shares its node with the anchor: visit each node once, or a "billion laughs" file
    # (aliases of aliases) would take forever. Values reached through an alias point at their parent key.
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            here = path + (key,)
            line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key in seen:
                problems.append(Problem("error", f"duplicate key (first defined on line {seen[key]}); YAML keeps "
                                        "only the last one", file=source, line=line, column=col,
                                        key=".".join(map(str, here)), hint="delete one of them"))
            seen[key] = line
            marks.key[here] = _Mark(line, col)
            marks.value[here] = _Mark(value_node.start_mark.line + 1, value_node.start_mark.column + 1)
            _walk(value_node, here, marks, problems, source, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            here = path + (index,)
            marks.key[here] = marks.value[here] = _Mark(item.start_mark.line + 1, item.start_mark.column + 1)
            _walk(item, here, marks, problems, source, seen_nodes)


def parse_yaml_text(text: str, source: str) -> tuple[dict, _Marks, list[Problem]]:
    """Parse a run YAML into (data, marks, problems); problems include syntax errors and duplicate keys."""
    problems: list[Problem] = []
    marks = _Marks()
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            problems.append(Problem("error", "the file is empty (no sections)", file=source, line=1, column=1,
                                    hint="start from a copy of configs/qwen2.5-vl-7b.yaml"))
            return {}, marks, problems
        _walk(node, (), marks, problems, source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(" ".join(str(x).split()) for x in (exc.context, exc.problem) if x) or "invalid YAML"
        problems.append(Problem("error", f"YAML syntax error: {what}", file=source,
                                line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
                                hint="YAML indents with spaces, never tabs" if "\\t" in what or "\t" in what
                                else "a run YAML is one document: delete the '---' line and what follows, or "
                                "merge it" if "single document" in what
                                else "check indentation, colons and quotes around this spot"))
        return {}, marks, problems
    except yaml.YAMLError as exc:
        problems.append(Problem("error", "YAML error: " + " ".join(str(exc).split()), file=source,
                                hint="save the file as plain UTF-8 text"))
        return {}, marks, problems
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        problems.append(Problem("error", f"the top level must be a mapping of sections, got {type(data).__name__}",
                                file=source, line=1, column=1, hint="sections: " + ", ".join(SECTIONS)))
        return {}, marks, problems
    return data, marks, problems


# --------------------------------------------------------------------------- validation

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
    ("model", "name_or_path"): "name_or_path: /models/Qwen2.5-VL-7B-Instruct (a local model folder)",
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


def _pydantic_problems(exc: ValidationError, marks: _Marks, source: str) -> list[Problem]:
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
                                    **_location(marks, source, loc, key_mark=True)))
        elif kind == "missing":
            owner = _model_at(loc[:-1])
            desc = owner.model_fields[loc[-1]].description if owner and loc[-1] in owner.model_fields else None
            example = _MISSING_EXAMPLES.get(loc)
            hint = f"add {example}" if example else (f"add '{loc[-1]}:' ({desc})" if desc else None)
            problems.append(Problem("error", "missing required key", key=dotted, hint=hint,
                                    **_location(marks, source, loc[:-1], key_mark=True)))
        else:
            message = _clean_message(err["msg"])
            secret = loc[:1] == ("storage",) and loc[-1] in SECRET_FIELDS
            if kind != "value_error" and "input" in err and not secret:
                message += f", got {_shown(err['input'])}"
            hint = None if secret or kind == "value_error" else _type_hint(err, loc)
            problems.append(Problem("error", message, key=dotted, hint=hint,
                                    **_location(marks, source, loc, key_mark=False)))
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


def validate_data(data: dict, marks: _Marks | None = None, source: str = "<config>",
                  path: Path | None = None) -> RunConfig:
    """Validate an already-parsed mapping; raise ProblemsError with every problem found."""
    marks = marks or _Marks()
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
    data, marks, problems = parse_yaml_text(text, source)
    if problems:
        raise ProblemsError(problems)
    from vlsft.overrides import apply_overrides

    problems = apply_overrides(data, marks, list(overrides))
    try:
        cfg = validate_data(data, marks, source, path.resolve())
    except ProblemsError as exc:
        raise ProblemsError(problems + exc.problems) from None
    if problems:
        raise ProblemsError(problems)
    return cfg

"""The run YAML's schema: one pydantic model per section (``model``, ``data``, ``training``, ``distributed``,
``output``, ``wandb``, ``storage``), ``extra="forbid"`` and a description on every key (torch-free).

```yaml
model:   {name_or_path: /models/Qwen2.5-VL-7B-Instruct, tune_mm_mlp: true, tune_mm_llm: true}
data:    {dictionary: Dataset-Dictionary.json, use: [docs%50, charts]}
training: {learning_rate: 2.0e-5, per_device_train_batch_size: 4, gradient_accumulation_steps: 4}
distributed: {nproc_per_node: 8, deepspeed: zero3}
output:  {dir: runs/first-try}
```

Keys that are trainer arguments of :mod:`qwenvl.arguments` are not written here: each section takes them from
the rows of :data:`vlsft.keymap.KEYS` (type, default and description from the trainer's dataclass). Keys
written here by hand either have no trainer counterpart (``data.use``, ``distributed.*``) or mirror
``transformers.TrainingArguments`` 5.24 (``tests/test_config.py`` compares those defaults with transformers).
Loading, overrides and error translation: :mod:`vlsft.config`; YAML line marks: :mod:`vlsft.yamlmarks`.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, create_model, field_validator

from qwenvl.arguments import owner_field
from qwenvl.problems import did_you_mean
from qwenvl.runpolicy import deepspeed_off
from vlsft.keymap import KEYS
from vlsft.yamlmarks import Marks, location

ENV_REF = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_URL_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@|[A-Za-z][A-Za-z0-9+.-]*://[^/@?#\s]*:[^@\s]*@")
SECRET_FIELDS = ("access_key_id", "secret_access_key", "session_token")

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
    # defer_build: a section class is built twice (here, then with its keymap fields by create_model); only the
    # models validation reaches are ever built, once, when print-args / train first validates (the front door's time)
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=False,
                              allow_inf_nan=False, defer_build=True)

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


def _with_keymap_fields(cls: type[_Section], section: str | None = None) -> type[_Section]:
    """``cls`` plus one field per keymap row of its section whose trainer dataclass owns the key: the YAML key
    gets the trainer field's type, default and help (and the row's limits), so the two cannot differ.
    ``section``: the dotted section (``model.lora``); default: the class name (``DataSection`` -> ``data``)."""
    section = section or cls.__name__.removesuffix("Section").lower()
    fields: dict[str, Any] = {}
    hints: dict[type, dict[str, Any]] = {}  # typing.get_type_hints once per trainer dataclass, not once per key
    for key in KEYS:
        if key.owner is None or key.section != section:
            continue
        f = owner_field(key.owner, key.flag)
        if key.owner not in hints:
            hints[key.owner] = typing.get_type_hints(key.owner)
        annotation = hints[key.owner][key.flag]
        help_text = f.metadata["help"] + ("" if key.flag == key.name else f" Trainer flag --{key.flag}.")
        fields[key.name] = (annotation, Field(f.default, description=help_text, **key.constraints))
    return create_model(cls.__name__, __base__=cls, __module__=__name__, __doc__=cls.__doc__, **fields)


class LoraSection(_Section):
    """LoRA adapters (PEFT) on the parts named by ``targets``; the ``tune_mm_*`` parts are still trained in full."""

    @field_validator("targets", mode="before", check_fields=False)  # targets: a keymap field
    @classmethod
    def _targets_list(cls, value: Any) -> Any:
        from qwenvl.lora_rules import LoraConfigError, parse_targets

        if value is None:
            return None
        if isinstance(value, list | tuple | str):
            try:
                return ",".join(parse_targets(value))
            except LoraConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("quantize", mode="before", check_fields=False)
    @classmethod
    def _quantize_word(cls, value: Any) -> Any:
        if value is None or value is False or (isinstance(value, str) and value.strip().lower() in ("", "none", "no",
                                                                                                   "off", "false")):
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value in (4, 8):
            return f"{value}bit"
        if isinstance(value, str) and value.strip().lower() in ("4bit", "8bit"):
            return value.strip().lower()
        raise ValueError(f"quantize must be 4bit, 8bit or none, got {value!r}")


LoraSection = _with_keymap_fields(LoraSection, "model.lora")


class ModelSection(_Section):
    """Which model to start from and which of its parts to train."""

    lora: LoraSection = Field(default_factory=LoraSection, description="LoRA adapters (see the model.lora.* keys); "
                              "off unless model.lora.enabled is true.")

    name_or_path: str = Field(description="The model to fine-tune (Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3.5; the "
                              "family is read from its config.json): a local folder (relative paths resolve against "
                              "the YAML folder) or a Hugging Face hub id such as Qwen/Qwen2.5-VL-7B-Instruct, which "
                              "`vlsft train` downloads into the standard HF cache (HF_HOME) first.")
    revision: str | None = Field(None, description="With a hub id in name_or_path: the branch, tag or commit to "
                                 "train from (default main). The saved run.yaml pins the commit trained from.")
    build_tiny: bool = Field(False, description="Demo/tests only: when name_or_path does not exist yet, `vlsft train` "
                             "first builds a tiny random Qwen2.5-VL there (real Qwen tokenizer, no download).")


ModelSection = _with_keymap_fields(ModelSection)

class DataSection(_Section):
    """What to train on and how samples become tokens and pixels."""

    dictionary: str = Field(description="Path (or s3:// URL) of the dataset dictionary JSON "
                            "(name -> data_path, annotation_path, length, sampling_rate | repeat_time; a "
                            "LLaMA-Factory dataset_info.json or an InternVL meta JSON is read too). "
                            "Relative paths resolve against the YAML folder.")
    use: list[str] | None = Field(None, description="Datasets to train on, as names or 'name%percent' "
                                  "('docs%50', 'charts%250' = 2.5 copies). Default: every dataset in the "
                                  "dictionary at its own sampling_rate / repeat_time. A comma string and a "
                                  "mapping {docs: 50, charts: null} are accepted too.")
    eval: list[str] | None = Field(None, description="Datasets to evaluate on (names of the dictionary, "
                                   "'name%percent' as in data.use; trainer flag --eval_dataset_use). Evaluated "
                                   "every training.eval_steps: eval loss in total and per dataset.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of the dataset sampling ('name%percent' subsets) and of the data "
                      "order; the same on every rank. Trainer flag --data_seed.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank "
                             "(--dataloader_num_workers; the official scripts use 4).")

    @field_validator("use", "eval", mode="before")
    @classmethod
    def _split_comma_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",")]
        if isinstance(value, dict):  # use: {docs: 50, charts: null} -> [docs%50, charts]
            return [str(k) if v is None else f"{k}%{v}" for k, v in value.items()]
        if isinstance(value, list):
            return [part.strip() if isinstance(part, str) else part for part in value]
        return value


DataSection = _with_keymap_fields(DataSection)

class TrainingSection(_Section):
    """Optimiser, schedule, batch and checkpointing (transformers.TrainingArguments names)."""

    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate. The official scripts' 2e-7 barely "
                                 "moves a new task; 1e-5 to 2e-5 is a good start for full fine-tuning.")
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
    eval_strategy: Literal["no", "steps", "epoch"] | None = Field(
        None, description="When to evaluate: steps (every eval_steps), epoch, or no. Default: steps when "
        "data.eval or data.eval_split is set, else no.")
    eval_steps: float | None = Field(None, gt=0, description="Evaluate every N optimizer steps (below 1: a "
                                     "fraction of the total steps); default: logging_steps.")
    per_device_eval_batch_size: int | None = Field(None, ge=1, description="Samples per GPU per evaluation "
                                                   "forward pass; default: per_device_train_batch_size.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Fraction of the total steps spent warming the "
                                "learning rate up from 0 (passed as --warmup_steps, which transformers 5 "
                                "reads as a ratio when below 1).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: str = Field("linear", description="Learning-rate schedule: "
                                   + ", ".join(LR_SCHEDULER_TYPES) + ".")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0 disables clipping).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of model initialisation and training randomness (--seed).")
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


TrainingSection = _with_keymap_fields(TrainingSection)

class DistributedSection(_Section):
    """How many processes on how many machines, and the DeepSpeed configuration."""

    nnodes: int = Field(1, ge=1, description="Number of machines.")
    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per machine.")
    node_rank: int = Field(0, ge=0, description="This machine's index, 0 .. nnodes-1 (usually an override: "
                           "distributed.node_rank=1).")
    master_addr: str | None = Field(None, description="Address (host name or IP) of the rank-0 machine. Default "
                                    "127.0.0.1 on one machine; required when nnodes > 1 unless SLURM supplies it "
                                    "(first host of SLURM_JOB_NODELIST) or rdzv_endpoint is set.")
    master_port: int = Field(29500, ge=1, le=65535, description="Free TCP port on the rank-0 machine. Left unset "
                             "on one machine (with master_addr unset too), torchrun runs --standalone and takes a "
                             "free port itself, so two runs on one machine never collide (also for a one-node SLURM job); a "
                             "SLURM job over several nodes takes 29500 + SLURM_JOB_ID mod 1000.")
    rdzv_endpoint: str | None = Field(None, description="host:port of a c10d rendezvous; when set it replaces "
                                      "node_rank/master_addr/master_port (elastic launch, e.g. on SLURM).")
    deepspeed: str = Field("zero3", description="zero2 | zero3 | zero3_offload (the JSON files shipped in "
                           "configs/), a path to your own DeepSpeed JSON, or none (plain DDP).")

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _deepspeed_off(cls, value: Any) -> Any:
        if deepspeed_off(value):  # `deepspeed:` (empty) / `deepspeed: false` / `off` / `no` (qwenvl.runpolicy)
            return "none"
        if value is True:
            raise ValueError("true is not a DeepSpeed configuration; write zero2, zero3, zero3_offload, none or "
                             "a path to a JSON file")
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
    @field_validator("resume", mode="before", check_fields=False)  # resume: a keymap field
    @classmethod
    def _resume_word(cls, value: Any) -> Any:
        if isinstance(value, bool) or value is None:
            raise ValueError("resume must be auto, never or a checkpoint path, got "
                             + ("null" if value is None else str(value).lower())
                             + " (YAML reads false/no/off as a boolean: write never)")
        if isinstance(value, str) and value.strip().lower() in ("auto", "never"):
            return value.strip().lower()
        return value


OutputSection = _with_keymap_fields(OutputSection)

class WandbSection(_Section):
    """Weights & Biases logging. The API key comes only from the WANDB_API_KEY environment variable."""

    project: str | None = Field(None, description="W&B project (WANDB_PROJECT).")
    entity: str | None = Field(None, description="W&B team or user (WANDB_ENTITY).")
    mode: Literal["online", "offline", "disabled"] | None = Field(None, description="online | offline (no network;"
                                                                 " sync later) | disabled. Default: online when "
                                                                 "project is set, else disabled. An explicit mode beats the WANDB_MODE environment variable, which beats "
                                                                 "that default.")

    @property
    def effective_mode(self) -> str:
        return self.mode_in({})

    def mode_in(self, environ) -> str:
        """The W&B mode: wandb.mode when the YAML sets it, else the environment's WANDB_MODE, else online when
        a project is set, else disabled (explicit YAML > environment > defaults)."""
        if self.mode is not None:
            return self.mode
        env = str(environ.get("WANDB_MODE", "")).strip().lower()
        if env in ("online", "offline", "disabled"):
            return env
        if env == "dryrun":
            return "offline"
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

    @field_validator("endpoint_url")
    @classmethod
    def _no_credentials_in_the_url(cls, value: str | None) -> str | None:
        if value is not None and not ENV_REF.match(value.strip()) and _URL_CREDENTIALS.match(value.strip()):
            raise ValueError("credentials in the endpoint URL (user:password@) would be shown in the plan and saved "
                             "with the run: write the URL without them and set storage.access_key_id / "
                             "secret_access_key to \"${VAR}\" references")
        return value

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
    _marks: Marks | dict = PrivateAttr(default_factory=dict)
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
        return location(self._marks, self._source_name(), tuple(path), key_mark=key)

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
# sections inside sections (``model.lora``): dotted name -> model
SUBSECTIONS: dict[str, type[_Section]] = {"model.lora": LoraSection}


def section_model(dotted: str) -> type[_Section]:
    """The model of a section or sub-section: ``data`` -> DataSection, ``model.lora`` -> LoraSection."""
    return SECTIONS[dotted] if dotted in SECTIONS else SUBSECTIONS[dotted]


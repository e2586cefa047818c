"""Where every run YAML key goes: the one table from YAML keys to ``qwenvl.train`` flags (torch-free).

Read a row as "``data.max_pixels`` becomes ``--max_pixels``". The table is used by

* :mod:`vlsft.schema` — a row with an ``owner`` (a dataclass of :mod:`qwenvl.arguments`) *creates* its YAML
  field: type, default and description come from the trainer's dataclass, so they cannot drift apart;
  rows without an owner name a YAML field written by hand in the schema (the trainer side is
  ``transformers.TrainingArguments``, or the plan computes the value);
* :func:`vlsft.plan.build_plan` — the trainer argv is rendered in this order, one ``--flag value`` per row;
* ``vlsft datasets preview --config`` — the data arguments it hands to the sample builder;
* :data:`vlsft.training_args.OWNED_BY_YAML` — ``training.extra`` may not set a flag a row owns.

To add a trainer argument with a run YAML key: one field in :mod:`qwenvl.arguments`, one row here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwenvl.arguments import DataArguments, ExtraTrainingArguments, ModelArguments


@dataclass(frozen=True)
class Key:
    yaml: str | None  # "section.key" or "section.sub.key"; None: a fixed flag the plan always passes (``value``)
    flag: str  # the trainer's argument name (without --)
    owner: type | None = None  # the qwenvl dataclass that owns the field (None: written by hand in vlsft.schema)
    constraints: dict[str, Any] = field(default_factory=dict)  # pydantic Field(...) limits of the YAML key
    value: Any = None  # for yaml None: the fixed value
    when: str | None = None  # a boolean YAML key: the flag is passed only when it is true (model.lora.enabled)

    @property
    def section(self) -> str:
        """Everything before the last dot: ``data`` for ``data.max_pixels``, ``model.lora`` for ``model.lora.r``."""
        return self.yaml.rsplit(".", 1)[0] if self.yaml else ""

    @property
    def name(self) -> str:
        return self.yaml.rsplit(".", 1)[1] if self.yaml else ""


M, D, X = ModelArguments, DataArguments, ExtraTrainingArguments

# In trainer argv order. Values of `computed` rows (see vlsft.plan) are resolved by the plan: paths against the
# YAML folder, data.use / data.eval -> the dataset_use / eval_dataset_use strings, training.eval_strategy -> steps when
# there is eval data, global_batch_size -> accumulation, wandb -> report_to.
KEYS: tuple[Key, ...] = (
    Key("model.name_or_path", "model_name_or_path"),
    Key("model.tune_mm_vision", "tune_mm_vision", M),
    Key("model.tune_mm_mlp", "tune_mm_mlp", M),
    Key("model.tune_mm_llm", "tune_mm_llm", M),
    Key("model.attn_implementation", "attn_implementation", M),
    Key("model.chat_template", "chat_template", D),
    Key("model.lora.enabled", "lora_enable", X, when="model.lora.enabled"),
    Key("model.lora.r", "lora_r", X, {"ge": 1}, when="model.lora.enabled"),
    Key("model.lora.alpha", "lora_alpha", X, {"gt": 0}, when="model.lora.enabled"),
    Key("model.lora.dropout", "lora_dropout", X, {"ge": 0, "lt": 1}, when="model.lora.enabled"),
    Key("model.lora.targets", "lora_targets", X, when="model.lora.enabled"),
    Key("model.lora.target_modules", "lora_target_modules", X, when="model.lora.enabled"),
    Key("model.lora.use_rslora", "lora_use_rslora", X, when="model.lora.enabled"),
    Key("model.lora.use_dora", "lora_use_dora", X, when="model.lora.enabled"),
    Key("model.lora.quantize", "lora_quantize", X, when="model.lora.enabled"),
    Key("data.dictionary", "dataset_dict"),
    Key("data.use", "dataset_use"),
    Key("data.eval", "eval_dataset_use"),
    Key("data.max_pixels", "max_pixels", D, {"gt": 0}),
    Key("data.min_pixels", "min_pixels", D, {"gt": 0}),
    Key("data.video_max_frames", "video_max_frames", D, {"gt": 0}),
    Key("data.video_min_frames", "video_min_frames", D, {"gt": 0}),
    Key("data.base_interval", "base_interval", D, {"gt": 0}),
    Key("data.video_max_frame_pixels", "video_max_frame_pixels", D, {"gt": 0}),
    Key("data.video_min_frame_pixels", "video_min_frame_pixels", D, {"gt": 0}),
    Key("data.video_fps", "video_fps", D, {"gt": 0}),
    Key("data.video_max_pixels", "video_max_pixels", D, {"gt": 0}),
    Key("data.video_min_pixels", "video_min_pixels", D, {"gt": 0}),
    Key("data.model_max_length", "model_max_length", D, {"gt": 0}),
    Key("data.flatten", "data_flatten", D),
    Key("data.packing", "data_packing", D),
    Key("data.packing_rows", "packing_rows", X, {"ge": 1}),
    Key("data.max_bad_sample_ratio", "max_bad_sample_ratio", D, {"ge": 0, "le": 1}),
    Key("data.eval_split", "eval_split", D, {"ge": 0, "lt": 1}),
    Key("output.dir", "output_dir"),
    Key("output.run_name", "run_name"),
    Key("output.resume", "resume", X),
    Key("output.overwrite", "overwrite_output_dir", X),
    Key("distributed.deepspeed", "deepspeed"),
    Key("training.per_device_train_batch_size", "per_device_train_batch_size"),
    Key("training.gradient_accumulation_steps", "gradient_accumulation_steps"),
    Key("training.num_train_epochs", "num_train_epochs"),
    Key("training.max_steps", "max_steps"),
    Key("training.learning_rate", "learning_rate"),
    Key("training.mm_projector_lr", "mm_projector_lr", X, {"gt": 0}),
    Key("training.vision_tower_lr", "vision_tower_lr", X, {"gt": 0}),
    Key("training.weight_decay", "weight_decay"),
    Key("training.warmup_ratio", "warmup_steps"),
    Key("training.lr_scheduler_type", "lr_scheduler_type"),
    Key("training.max_grad_norm", "max_grad_norm"),
    Key("training.bf16", "bf16"),
    Key("training.gradient_checkpointing", "gradient_checkpointing"),
    Key(None, "save_strategy", value="steps"),
    Key("training.save_steps", "save_steps"),
    Key("training.save_total_limit", "save_total_limit"),
    Key("training.logging_steps", "logging_steps"),
    Key("training.eval_strategy", "eval_strategy"),
    Key("training.eval_steps", "eval_steps"),
    Key("training.per_device_eval_batch_size", "per_device_eval_batch_size"),
    Key("data.num_workers", "dataloader_num_workers"),
    Key("training.seed", "seed"),
    Key("data.seed", "data_seed"),
    Key("training.report_to", "report_to"),
)

# Trainer names that no row passes but that the YAML still owns (training.extra may not set them).
OWNED_ELSEWHERE: dict[str, str] = {
    "local_rank": "distributed (torchrun sets the local rank)",
    "activation_checkpointing": "training.gradient_checkpointing",
    "warmup_ratio": "training.warmup_ratio",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps or training.global_batch_size",
    "report_to": "training.report_to (or the wandb section)",
}


def by_yaml(dotted: str) -> Key:
    for key in KEYS:
        if key.yaml == dotted:
            return key
    raise KeyError(dotted)


def owned_by(owner: type) -> tuple[Key, ...]:
    """The rows whose trainer field ``owner`` defines (e.g. every DataArguments key of the run YAML)."""
    return tuple(k for k in KEYS if k.owner is owner)


def owned_by_yaml() -> dict[str, str]:
    """trainer flag -> the run YAML key that sets it (what ``training.extra`` must not duplicate)."""
    table = {k.flag: k.yaml for k in KEYS if k.yaml is not None}
    table.update(OWNED_ELSEWHERE)
    return table


def walk(cfg: Any, dotted: str) -> Any:
    """The value at a dotted YAML path of a RunConfig (``model.lora.r`` -> ``cfg.model.lora.r``)."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def yaml_value(cfg: Any, key: Key) -> Any:
    """The value of ``key`` in a RunConfig (the fixed value for rows without a YAML key; None, i.e. no flag, for a
    row whose ``when`` key is false)."""
    if key.yaml is None:
        return key.value
    if key.when is not None and not walk(cfg, key.when):
        return None
    return walk(cfg, key.yaml)

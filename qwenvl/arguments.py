"""Every argument of ``qwenvl.train`` that vlsft adds or shares with the official trainer: the one owner of
their names, types, defaults and help texts (torch-free).

* :class:`ModelArguments` and :class:`DataArguments` carry the official trainer's names
  (``model_name_or_path``, ``tune_mm_*``, ``max_pixels``, ``video_max_frames``, ...).
* :class:`ExtraTrainingArguments` holds what vlsft adds to ``transformers.TrainingArguments`` (separate
  learning rates, ``resume``, ...) and the official scripts' names transformers 5 no longer has.
  :class:`qwenvl.train_args.TrainingArguments` inherits these fields; it is the only part that imports
  transformers.

Who reads these defaults: the trainer's ``HfArgumentParser``; the run YAML (``vlsft.schema`` builds its
fields for the keys of ``vlsft.keymap`` from them, so ``data.max_pixels`` and ``--max_pixels`` cannot
disagree); :class:`qwenvl.data.sample.VisionBudget` (its fields are the ``budget`` fields below).

To add a trainer argument: add a field here (``metadata={"help": ...}``); if the run YAML should set it,
add one row to ``vlsft.keymap.KEYS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

_BUDGET: list = []  # the Field objects of the budget arguments, filled by arg(..., budget=True)


def arg(default: Any, help: str, *, budget: bool = False) -> Any:  # noqa: A002 - the dataclass metadata name
    """A dataclass field with its help text (HfArgumentParser passes metadata to argparse: only ``help`` goes
    there); ``budget=True`` marks the pixel/frame limits of :class:`VisionBudget`."""
    f = field(default=default, metadata={"help": help})
    if budget:
        _BUDGET.append(f)
    return f


@dataclass
class ModelArguments:
    model_name_or_path: str = arg("Qwen/Qwen2.5-VL-3B-Instruct", "Local model directory (Qwen2-VL, Qwen2.5-VL or "
                                  "Qwen3-VL; the family is read from its config.json).")
    tune_mm_vision: bool = arg(False, "Train the vision transformer (ViT) blocks. The official README advises false "
                               "when training on image and video data together.")
    tune_mm_mlp: bool = arg(False, "Train the vision-language merger (projector).")
    tune_mm_llm: bool = arg(False, "Train the language model and lm_head.")
    attn_implementation: str | None = arg(None, "Attention kernel: sdpa, eager, flash_attention_2, ... (default: "
                                          "the best available).")


@dataclass
class DataArguments:
    dataset_use: str = arg("", "Datasets to train on: 'name[%percent],...' (decimal percents allowed; above 100 "
                           "up-samples, e.g. 'a%250' = 2.5 copies).")
    dataset_dict: str | None = arg(None, "Path/URL of the dataset dictionary JSON (name -> data_path, "
                                   "annotation_path, length, sampling_rate | repeat_time).")
    max_pixels: int = arg(576 * 28 * 28, "Image pixel budget (H*W after resize); one image costs up to "
                          "max_pixels / 784 tokens (100352 -> 128, 50176 -> 64).", budget=True)
    min_pixels: int = arg(16 * 28 * 28, "Image pixel floor (H*W after resize).", budget=True)
    video_max_frames: int = arg(8, "Most frames sampled from one video.", budget=True)
    video_min_frames: int = arg(4, "Fewest frames sampled from one video.", budget=True)
    base_interval: float = arg(2, "Seconds between sampled video frames.", budget=True)
    video_max_frame_pixels: int = arg(32 * 28 * 28, "Per-frame pixel budget for videos.", budget=True)
    video_min_frame_pixels: int = arg(4 * 28 * 28, "Per-frame pixel floor for videos.", budget=True)
    # the official HEAD names (QwenLM/Qwen3-VL qwen-vl-finetune); unset = the family's default, see
    # qwenvl.data.sample.resolve_video_budget for the mapping onto base_interval / video_*_frame_pixels
    video_fps: float | None = arg(None, "Official HEAD name: video frames sampled per second. Qwen3-VL family: "
                                  "HEAD's sampling (default 2); Qwen2/2.5-VL: the same as base_interval = "
                                  "1 / video_fps.", budget=True)
    video_max_pixels: int | None = arg(None, "Official HEAD name: video pixel budget. Qwen3-VL family: bounds "
                                       "frames x H x W of all sampled frames together (default 1024*28*28 = "
                                       "802816); Qwen2/2.5-VL: per frame, the same as video_max_frame_pixels.",
                                       budget=True)
    video_min_pixels: int | None = arg(None, "Official HEAD name: video pixel floor. Qwen3-VL family: frames x H "
                                       "x W together (default 256*28*28 = 200704); Qwen2/2.5-VL: per frame, the "
                                       "same as video_min_frame_pixels.", budget=True)
    chat_template: str | None = arg(None, "The published chat template samples are rendered as, for a model folder "
                                    "whose template vlsft does not recognise: qwen3.5, qwen3.6 or qwen3.8 (Qwen3.5-"
                                    "architecture models; default: detected from the folder's chat template, else "
                                    "the family's).")
    model_max_length: int = arg(8192, "Longest token sequence per sample (or per packed row). Longer samples are "
                                "skipped and counted; vision tokens are never cut.")
    data_flatten: bool = arg(False, "Concatenate each per-device batch into one row without padding (varlen "
                             "attention).")
    data_packing: bool = arg(False, "Pack samples online into rows of at most model_max_length tokens (varlen "
                             "attention; no padding, no offline tool). Step counts become estimates.")
    eval_dataset_use: str = arg("", "Datasets to evaluate on: 'name[%percent],...' (the dataset_use grammar; "
                                "names of the dictionary). Evaluated at eval_steps, loss in total and per dataset.")
    eval_split: float | None = arg(None, "Hold out this seeded fraction of each training dataset's records for evaluation "
                            "(never trained on; the same on every rank and on resume), e.g. 0.02; unset: none.")
    max_bad_sample_ratio: float = arg(0.01, "Stop the run when, at 99 % confidence (one-sided Clopper-Pearson "
                                      "lower bound over all ranks' counts so far), more than this fraction of the "
                                      "samples read were broken (skipped).")


@dataclass
class ExtraTrainingArguments:
    """vlsft's additions to ``transformers.TrainingArguments`` (and official names transformers 5 dropped)."""

    mm_projector_lr: float | None = arg(None, "Learning rate of the vision-language merger (projector); default: "
                                        "learning_rate.")
    vision_tower_lr: float | None = arg(None, "Learning rate of the vision tower (without the merger); default: "
                                        "learning_rate. Independent of mm_projector_lr; used only when "
                                        "tune_mm_vision is true.")
    warmup_ratio: float | None = arg(None, "Official-script name: fraction of the total steps spent warming up, in "
                                     "[0, 1) (transformers 5: --warmup_steps below 1 is the same).")
    cache_dir: str | None = arg(None, "Official-script argument, accepted and unused (model_name_or_path is a "
                                "local folder).")
    lora_enable: bool = arg(False, "Train LoRA adapters (PEFT) instead of full weights on the parts named by "
                            "lora_targets; the tune_mm_* parts are still trained in full.")
    lora_r: int = arg(64, "LoRA rank (official default 64).")
    lora_alpha: int = arg(128, "LoRA alpha; the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora).")
    lora_dropout: float = arg(0.0, "Dropout on the LoRA input (0.0 is honoured, unlike the official trainer).")
    lora_targets: str | None = arg(None, "Parts that get adapters on all their linear layers: llm, vision, "
                                   "merger, comma-separated (default: llm, as the official --lora_enable). A part "
                                   "may not be both LoRA-targeted and trained in full by its tune_mm_* flag.")
    lora_target_modules: str | None = arg(None, "Advanced: a regular expression matched (whole) against module "
                                          "names, e.g. '.*layers\\.\\d+\\.mlp\\.experts.*'; replaces "
                                          "lora_targets; only linear layers are taken.")
    lora_use_rslora: bool = arg(False, "Rank-stabilised LoRA (PEFT use_rslora: scale alpha / sqrt(r)).")
    lora_use_dora: bool = arg(False, "Weight-decomposed LoRA (PEFT use_dora).")
    lora_quantize: str | None = arg(None, "QLoRA: load the frozen base weights in 4bit or 8bit (bitsandbytes; "
                                    "needs a CUDA GPU).")
    packing_rows: int | None = arg(None, "With data_packing: rows of model_max_length tokens per device per step, "
                                   "i.e. a token budget of packing_rows x model_max_length per device per step, "
                                   "filled from estimated sample lengths (per_device_train_batch_size is then unused "
                                   "for training); unset: per_device_train_batch_size samples per step.")
    resume: str = arg("auto", "auto: continue from the newest complete checkpoint in the output dir (fresh start "
                      "if none); never: start fresh; PATH: continue from that checkpoint.")
    overwrite_output_dir: bool = arg(False, "Allow a fresh start (resume never) in an output dir that already "
                                     "holds a run (nothing is deleted: the earlier checkpoints and final model are set "
                                     "aside in superseded-<time>/).")


def owner_field(owner: type, name: str):
    """The :class:`dataclasses.Field` ``name`` of ``owner`` (KeyError with the known names otherwise)."""
    for f in fields(owner):
        if f.name == name:
            return f
    raise KeyError(f"{owner.__name__} has no field {name!r}")


def budget_fields() -> tuple[str, ...]:
    """The pixel / frame limits that shape vision inputs (the fields of :class:`~qwenvl.data.sample.VisionBudget`)."""
    return tuple(f.name for f in fields(DataArguments) if any(f is b for b in _BUDGET))

"""Model arguments of ``qwenvl.train`` (torch-free), named as in the official trainer.

Training arguments are ``transformers.TrainingArguments`` plus ``mm_projector_lr`` /
``vision_tower_lr`` (see ``qwenvl.train``); data arguments live in ``qwenvl.data.arguments``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2.5-VL-3B-Instruct", metadata={"help": "Local model "
                                    "directory (Qwen2-VL, Qwen2.5-VL or Qwen3-VL; the family is read from config.json)."})
    tune_mm_vision: bool = field(default=False, metadata={"help": "Train the vision transformer blocks."})
    tune_mm_mlp: bool = field(default=False, metadata={"help": "Train the vision-language merger (projector)."})
    tune_mm_llm: bool = field(default=False, metadata={"help": "Train the language model and lm_head."})
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel "
                                            "(sdpa, eager, flash_attention_2, ...); default: best available."})

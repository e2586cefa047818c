"""``transformers.TrainingArguments`` plus the vlsft / official extras (imports transformers).

Extras (fields, defaults and help in :class:`qwenvl.arguments.ExtraTrainingArguments`): ``--mm_projector_lr``, ``--vision_tower_lr`` (independent of each other), the LoRA
arguments (official ``--lora_enable/--lora_r/--lora_alpha/--lora_dropout`` plus ``--lora_targets``,
``--lora_target_modules``, ``--lora_use_rslora``, ``--lora_use_dora``, ``--lora_quantize``; see :mod:`qwenvl.lora`), ``--resume``
(``auto`` | ``never`` | PATH) and ``--overwrite_output_dir``; the official scripts' ``--warmup_ratio`` (gone
from transformers 5) becomes ``warmup_steps`` (a value below 1 is a ratio there), and the official
``--gradient_checkpointing`` becomes ``activation_checkpointing`` (no deprecation warning). Kept out of ``qwenvl.arguments`` so that
module stays importable without torch.

CPU handling (no CUDA), decided by :func:`qwenvl.train.main` before parsing and applied here in
``__post_init__``: with DeepSpeed, accelerate must use the already-created gloo state
(``accelerator_config.use_configured_state``) and bf16 must be off in the arguments (it goes into the
DeepSpeed config instead); without DeepSpeed, ``use_cpu`` and the gloo DDP backend are set.
"""

from __future__ import annotations

from dataclasses import dataclass

import transformers

from qwenvl.arguments import ExtraTrainingArguments


@dataclass
class TrainingArguments(ExtraTrainingArguments, transformers.TrainingArguments):
    """``transformers.TrainingArguments`` + :class:`qwenvl.arguments.ExtraTrainingArguments` (defaults live there)."""

    # set by qwenvl.train before parsing; class-level so HfArgumentParser does not expose them
    _cpu_mode = None  # None (CUDA present), "deepspeed", "ddp" or "single" (one CPU process)

    def __post_init__(self):
        self.cpu_bf16 = False
        if self.lora_quantize is not None and self.lora_quantize.strip().lower() in ("", "none", "no", "false"):
            self.lora_quantize = None
        if self.lora_quantize is not None and self.lora_quantize not in ("4bit", "8bit"):
            raise ValueError(f"lora_quantize {self.lora_quantize!r} must be 4bit, 8bit or none")
        if self.lora_enable and self.lora_r < 1:
            raise ValueError(f"lora_r {self.lora_r} must be at least 1")
        if self.lora_enable and not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout {self.lora_dropout} must be in [0, 1)")
        if self.warmup_ratio is not None:  # transformers 5 dropped --warmup_ratio; the official scripts pass it
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"warmup_ratio {self.warmup_ratio} must be in [0, 1) (or use --warmup_steps N)")
            if self.warmup_ratio > 0:
                self.warmup_steps = self.warmup_ratio
        # transformers 5.x renamed gradient_checkpointing* to activation_checkpointing*; the official names are
        # still accepted and moved over here, so transformers does not warn about them
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old, None) is not None:
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        mode = type(self)._cpu_mode
        if mode == "deepspeed":
            if self.accelerator_config is None:
                self.accelerator_config = {"use_configured_state": True}
            if self.bf16:
                self.bf16 = False
                self.cpu_bf16 = True
        elif mode == "single" and self.bf16:
            self.use_cpu = True  # transformers refuses bf16 without a GPU unless told the run is on CPU
        elif mode == "ddp":
            self.use_cpu = True
            if self.ddp_backend is None:
                self.ddp_backend = "gloo"
        super().__post_init__()
        if self.uses_activation_checkpointing:
            kw_name = ("activation_checkpointing_kwargs" if hasattr(self, "activation_checkpointing_kwargs")
                       else "gradient_checkpointing_kwargs")
            kw = getattr(self, kw_name) or {}
            if isinstance(kw, dict) and "use_reentrant" not in kw:  # explicit: torch warns when it is left out
                setattr(self, kw_name, {**kw, "use_reentrant": False})
        if mode == "deepspeed" and self.cpu_bf16 and getattr(self, "hf_deepspeed_config", None) is not None:
            cfg = self.hf_deepspeed_config.config
            cfg.setdefault("bf16", {})["enabled"] = True
            cfg.setdefault("fp16", {})["enabled"] = False

    @property
    def uses_activation_checkpointing(self) -> bool:
        return bool(getattr(self, "activation_checkpointing", None) or getattr(self, "gradient_checkpointing", None))

    @property
    def wants_bf16(self) -> bool:
        return bool(self.bf16 or self.cpu_bf16)


"""LoRA (PEFT) for Qwen2-VL / Qwen2.5-VL / Qwen3-VL: which parts get adapters, which are trained in full.

Rules (one place; the front door ``vlsft print-args`` / ``train`` and the trainer both call them):

* ``lora_targets`` names parts (:data:`qwenvl.model.PARTS`: ``llm``, ``vision``, ``merger``); every linear layer
  of a named part gets an adapter (``lm_head`` never does). ``lora_target_modules`` (a regular expression
  matched whole against module names) replaces it for expert layers and other special cases.
* The ``tune_mm_*`` flags keep their meaning: those parts are trained in full next to the adapters, so
  ``tune_mm_mlp`` + LoRA on the language model is "LoRA LLM + fully trained merger". A part that is both fully
  trained and LoRA-targeted is refused (:class:`LoraConfigError`, one line). Exception, for the official scripts
  (``sft_30a3b_lora.sh`` passes ``--tune_mm_llm True --lora_enable True``): with ``lora_targets`` left unset, an
  official ``tune_mm_llm True`` means "train the language model through its adapters".
* Learning rates follow the part: adapters on the vision tower take ``vision_tower_lr``, on the merger
  ``mm_projector_lr`` (:func:`qwenvl.model.parameter_groups`).
* Checkpoint layout (:func:`save_lora_extras`): PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``,
  the fully-trained parts in ``trained_parts.safetensors`` (names as in the transformers model), and
  ``vlsft-lora.json`` written last (base model, parts, files): a checkpoint without it is incomplete
  (:mod:`qwenvl.runpolicy`).

The torch-free rules (target grammar, refusals, trainable counts from the safetensors headers) live in
:mod:`qwenvl.lora_rules`, which the front door imports; this module adds PEFT and torch.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qwenvl.lora_rules import (  # noqa: F401 - the torch-free rules, re-exported for the trainer side
    PARTS,
    PARTS_FILE,
    QUANTIZE,
    TUNE_FLAG,
    LoraConfigError,
    LoraPlan,
    format_report,
    is_linear_weight,
    linear_module_matches,
    linear_modules,
    parameter_report,
    parse_targets,
    quantize_conflict,
    quantize_problem,
    resolve_targets,
    runtime_name,
    saved_part,
    target_modules_problem,
    weight_shapes,
)
from qwenvl.problems import UserError
from qwenvl.runpolicy import ADAPTER_CONFIG, ADAPTER_FILES  # noqa: F401 - re-exported (the folder layout)
from qwenvl.runpolicy import LORA_MANIFEST as META

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------------
# the trainer side (torch, peft)
# ---------------------------------------------------------------------------------------------------
def target_module_names(model, plan: LoraPlan) -> list[str]:
    """Names of the linear modules that get adapters (``lm_head`` excluded), in model order."""
    import torch

    from qwenvl.model import part_of_parameters

    parts = part_of_parameters(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.split(".")[-1] == "lm_head":
            continue
        part = parts.get(f"{name}.weight")
        if part is None:
            continue
        if linear_module_matches(name, part, plan):
            names.append(name)
    return names


def lora_config(model, plan: LoraPlan, *, r: int, alpha: int, dropout: float, use_rslora: bool = False,
                use_dora: bool = False):
    from peft import LoraConfig

    names = target_module_names(model, plan)
    if not names:
        what = f"lora target_modules {plan.regex!r}" if plan.regex else f"lora targets {', '.join(plan.targets)}"
        raise LoraConfigError(f"{what} match no linear layer of this model: check the regular expression against "
                              "the module names (e.g. model.language_model.layers.0.self_attn.q_proj)")
    if plan.regex:
        parts = {}
        from qwenvl.model import part_of_parameters

        pp = part_of_parameters(model)
        for n in names:
            parts[pp[f"{n}.weight"]] = n
        both = [p for p in parts if p in plan.full]
        if both:
            p = both[0]
            raise LoraConfigError(f"{TUNE_FLAG[p]} is true and lora target_modules match {parts[p]} (part {p}): a "
                                  f"part is either trained in full or gets adapters; set {TUNE_FLAG[p]} false or "
                                  "narrow the regular expression")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none",
                      use_rslora=use_rslora, use_dora=use_dora)


def apply_lora(model, plan: LoraPlan, *, r: int, alpha: int, dropout: float, use_rslora: bool = False,
               use_dora: bool = False):
    """Wrap ``model`` in a PEFT model: adapters per ``plan``, the ``plan.full`` parts trainable in full, the rest
    frozen. Returns the PEFT model."""
    from peft import get_peft_model

    from qwenvl.model import part_of_parameters

    cfg = lora_config(model, plan, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
    # adapters in the base weights' dtype: DeepSpeed ZeRO keeps one dtype per parameter group (and fp32 masters
    # itself); PEFT would otherwise up-cast them to float32 next to bf16 base weights
    peft_model = get_peft_model(model, cfg, autocast_adapter_dtype=False)
    set_full_parts_trainable(peft_model, plan.full)
    parts = part_of_parameters(peft_model)
    n_lora = sum(1 for n, p in peft_model.named_parameters() if p.requires_grad and is_lora_param(n))
    logger.info("LoRA r=%d alpha=%d dropout=%g on %d linear layers (%s); trained in full: %s; %d adapter tensors",
                r, alpha, dropout, len(cfg.target_modules), plan.regex or ", ".join(plan.targets),
                ", ".join(plan.full) or "nothing", n_lora)
    del parts
    return peft_model


def is_lora_param(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def set_full_parts_trainable(peft_model, full: tuple[str, ...]) -> None:
    """PEFT freezes every base weight; the ``tune_mm_*`` parts are trained in full again (not their LoRA-wrapped
    base layers, which cannot be both)."""
    from qwenvl.model import part_of_parameters

    parts = part_of_parameters(peft_model)
    for name, p in peft_model.named_parameters(remove_duplicate=False):
        if is_lora_param(name):
            continue
        p.requires_grad_(parts[name] in full)


def base_name(peft_name: str) -> str:
    """A PEFT parameter name -> the name inside the transformers model (``base_model.model.`` and
    ``.base_layer`` removed)."""
    name = peft_name[len("base_model.model."):] if peft_name.startswith("base_model.model.") else peft_name
    return name.replace(".base_layer.", ".")


def gather_full_parts(peft_model) -> dict:
    """The fully-trained parameters (ZeRO-3 shards gathered; a collective: call on every rank), keyed by their
    names in the transformers model, as CPU tensors."""
    import torch

    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad and not is_lora_param(n)]
    out = {}
    zero3 = any(hasattr(p, "ds_id") for _, p in named)
    if zero3:
        import deepspeed

        for n, p in named:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[base_name(n)] = p.detach().to("cpu", copy=True).contiguous()
    else:
        for n, p in named:
            out[base_name(n)] = p.detach().to("cpu", copy=True).contiguous()
    del torch
    return out


_SIGNATURE_KEYS = {"text": ("hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads"),
                   "vision": ("hidden_size", "depth", "out_hidden_size")}


def model_signature(config: dict) -> dict:
    """What an adapter must match in a base model: its ``model_type`` and the sizes of its language model and vision
    tower (a config.json as a dict, nested ``text_config`` / ``vision_config`` or the older flat layout)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    sig = {"model_type": config.get("model_type")}
    for side, part in (("text", text), ("vision", vision)):
        for key in _SIGNATURE_KEYS[side]:
            if part.get(key) is not None:
                sig[f"{side}.{key}"] = part[key]
    return sig


def signature_mismatch(want: dict, got: dict) -> str | None:
    """``"model_type qwen2_5_vl vs qwen2_vl, ..."`` for the keys both signatures have and differ in; None if none."""
    diffs = [f"{k} {want[k]} vs {got[k]}" for k in want if k in got and want[k] != got[k]]
    return ", ".join(diffs) if diffs else None


def save_lora_extras(peft_model, folder: str | os.PathLike, *, should_save: bool, plan: LoraPlan,
                     base_model: str, settings: dict) -> None:
    """Next to PEFT's adapter files: the fully-trained parts and ``vlsft-lora.json`` (written last)."""
    from safetensors.torch import save_file

    tensors = gather_full_parts(peft_model) if plan.full else {}
    if not should_save:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    if tensors:
        tmp = folder / (PARTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / PARTS_FILE)
        files.append(PARTS_FILE)
    base_config = getattr(getattr(peft_model, "get_base_model", lambda: peft_model)(), "config", None)
    meta = {"base_model": str(base_model), "targets": list(plan.targets), "target_modules": plan.regex,
            "trained_in_full": list(plan.full), "files": files, **settings,
            "base_signature": model_signature(base_config.to_dict()) if base_config is not None else None}
    tmp = folder / (META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / META)


def load_full_parts(model, folder: str | os.PathLike) -> int:
    """Copy ``trained_parts.safetensors`` of ``folder`` into ``model`` (a transformers model or its PEFT
    wrapper; not ZeRO-3 partitioned). Returns the number of tensors loaded."""
    import torch
    from safetensors.torch import load_file

    path = Path(folder) / PARTS_FILE
    if not path.is_file():
        return 0
    tensors = load_file(str(path))
    params = {base_name(n): p for n, p in model.named_parameters()}
    missing = [k for k in tensors if k not in params]
    if missing:
        raise UserError(f"{path}: {len(missing)} tensors do not belong to this model (e.g. {missing[0]}): the "
                        "checkpoint was trained from another base model")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
    return len(tensors)


def quantization_kwargs(quantize: str | None, dtype) -> dict:
    """``from_pretrained`` kwargs for QLoRA (a ``BitsAndBytesConfig``), empty without quantization."""
    if quantize in (None, "", "none"):
        return {}
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head", "visual"])
    elif quantize == "8bit":
        cfg = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head", "visual"])
    else:
        raise LoraConfigError(f"lora quantize {quantize!r} is not one of 4bit, 8bit")
    return {"quantization_config": cfg}


def __getattr__(name: str):
    """``SaveExtrasCallback`` is built on first use (transformers is imported only by the trainer side)."""
    if name != "SaveExtrasCallback":
        raise AttributeError(name)
    from transformers import TrainerCallback

    class SaveExtrasCallback(TrainerCallback):
        """After each checkpoint save (on every rank: ZeRO-3 gathers): the trained parts + manifest into it."""

        def __init__(self, save):
            self.save = save

        def on_save(self, args, state, control, **kwargs):
            self.save(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
            return control

    globals()["SaveExtrasCallback"] = SaveExtrasCallback
    return SaveExtrasCallback

"""Model loading, freezing and optimizer parameter groups for Qwen2-VL / Qwen2.5-VL / Qwen3-VL.

* The model class comes from ``config.json``'s ``model_type`` (never from the folder name).
* Every parameter belongs to exactly one *part*:

  - ``vision``: the vision tower except its merger(s) (patch embedding, position embedding, blocks);
  - ``merger``: the vision-language projector (``visual.merger`` and Qwen3-VL's ``deepstack_merger_list``);
  - ``llm``: the language model (embeddings, decoder layers, final norm) and ``lm_head``.

* LoRA (:mod:`qwenvl.lora`) wraps the model with PEFT after freezing; every function here also takes the PEFT
  model (adapters count in the part of the layer they wrap).
* Freezing sets ``requires_grad`` on the parameters themselves (an untied ``lm_head`` follows
  ``tune_mm_llm`` like the rest of the language model; a tied one is the embedding matrix).
* Learning rates: ``mm_projector_lr`` applies to merger parameters and ``vision_tower_lr`` to other
  vision parameters, each independently of the other (``None`` -> ``learning_rate``). Weight decay skips
  biases and normalisation weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qwenvl.families import PARTS, ModelTypeError, family, read_model_type  # noqa: F401 - PARTS re-exported
from qwenvl.problems import UserError

logger = logging.getLogger(__name__)


def model_class(model_type: str):
    """The transformers class of a family (:attr:`qwenvl.families.Family.model_class`)."""
    import transformers

    fam = family(model_type)
    try:
        return getattr(transformers, fam.model_class)
    except AttributeError as e:  # an older transformers without this family
        raise ModelTypeError(
            f"model_type {fam.model_type!r} needs a newer transformers (installed {transformers.__version__})"
        ) from e


def load_model(name_or_path: str, *, dtype=None, attn_implementation: str | None = None, **extra):
    """Load the model with the class named by its config.json ``model_type`` (``extra``: more ``from_pretrained``
    kwargs, e.g. QLoRA's ``quantization_config``)."""
    model_type = read_model_type(name_or_path)
    cls = model_class(model_type)
    kwargs: dict = dict(extra)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    logger.info("loading %s from %s (%s)", cls.__name__, name_or_path, kwargs)
    return cls.from_pretrained(name_or_path, **kwargs)


def unwrap_peft(model):
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(type(model), "get_base_model", None)
    return model.get_base_model() if get_base is not None else model


def _visual(model):
    inner = getattr(unwrap_peft(model), "model", model)
    visual = getattr(inner, "visual", None)
    if visual is None:
        raise ModelTypeError(f"{type(model).__name__} has no vision tower (model.model.visual)")
    return visual


def part_of_parameters(model) -> dict[str, str]:
    """Map every parameter name (tied duplicates included) to ``vision`` / ``merger`` / ``llm``; for a PEFT model
    its names, adapters included (an adapter belongs to the part of the layer it wraps)."""
    visual = _visual(model)
    merger_ids: set[int] = set()
    for name, module in visual.named_children():
        if name == "merger" or name.startswith("deepstack_merger"):
            merger_ids.update(id(p) for p in module.parameters())
    vision_ids = {id(p) for p in visual.parameters()}
    parts: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in merger_ids:
            parts[name] = "merger"
        elif id(p) in vision_ids:
            parts[name] = "vision"
        else:
            parts[name] = "llm"
    return parts


def apply_freezing(model, *, tune_mm_vision: bool, tune_mm_mlp: bool, tune_mm_llm: bool) -> dict[str, int]:
    """Set ``requires_grad`` on every parameter per the three flags; returns trainable counts per part."""
    want = {"vision": tune_mm_vision, "merger": tune_mm_mlp, "llm": tune_mm_llm}
    parts = part_of_parameters(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, part in parts.items():
        params[name].requires_grad_(want[part])
    counts = {k: 0 for k in PARTS}
    for name, p in model.named_parameters():  # deduplicated
        if p.requires_grad:
            counts[parts[name]] += numel(p)
    return counts


def trainable_counts(model) -> dict[str, int]:
    """Trainable element count per part (a PEFT model's adapters in the part of the layer they wrap)."""
    parts = part_of_parameters(model)
    counts = {k: 0 for k in PARTS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[parts[name]] += numel(p)
    return counts


def numel(p) -> int:
    """Element count, also for parameters partitioned by DeepSpeed ZeRO-3."""
    return int(getattr(p, "ds_numel", 0) or p.numel())


def trainable_parameter_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _no_decay_names(model) -> set[str]:
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            if is_norm or p_name == "bias":
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def parameter_groups(model, *, learning_rate: float, weight_decay: float, mm_projector_lr: float | None = None,
                     vision_tower_lr: float | None = None) -> list[dict]:
    """Optimizer groups over trainable parameters: one per (part learning rate, decay / no decay).

    Each group dict carries ``name`` (e.g. ``merger``, ``merger.no_decay``) so logs can label its lr.
    """
    parts = part_of_parameters(model)
    no_decay = _no_decay_names(model)
    lrs = {
        "llm": learning_rate,
        "vision": vision_tower_lr if vision_tower_lr is not None else learning_rate,
        "merger": mm_projector_lr if mm_projector_lr is not None else learning_rate,
    }
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = parts[name]
        decay = name not in no_decay
        g = groups.setdefault((part, decay), {
            "name": part if decay else f"{part}.no_decay",
            "params": [], "lr": lrs[part],
            "weight_decay": weight_decay if decay else 0.0,
        })
        g["params"].append(p)
    order = [(p, d) for p in ("llm", "vision", "merger") for d in (True, False)]
    return [groups[k] for k in order if k in groups]


def count_parameters(model) -> dict[str, int]:
    """Total element count per part (ZeRO-3 aware)."""
    parts = part_of_parameters(model)
    out = {k: 0 for k in PARTS}
    for name, p in model.named_parameters():
        out[parts[name]] += numel(p)
    return out


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class ProcessorError(UserError, ValueError):
    """The model directory has no usable tokenizer (a processor can be rebuilt, a tokenizer cannot)."""


def load_processor(name_or_path: str | os.PathLike, model_type: str | None = None):
    """``AutoProcessor`` of the model folder; when the folder has a tokenizer but no processor settings (e.g. a
    checkpoint saved by the official trainer, which does not save the processor), the family's default image /
    video processor settings are used with the folder's patch sizes from ``config.json`` (a warning says so)."""
    from transformers import AutoProcessor

    folder = Path(name_or_path)
    if any((folder / f).is_file() for f in PROCESSOR_FILES) or not folder.is_dir():
        return AutoProcessor.from_pretrained(str(name_or_path))
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ProcessorError(f"{name_or_path}: no tokenizer (tokenizer.json / tokenizer_config.json) and no "
                             "preprocessor_config.json; copy them from the base model folder")
    import tempfile

    model_type = model_type or read_model_type(name_or_path)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vision = cfg.get("vision_config") or {}
    pre = json.loads(json.dumps(dict(family(model_type).processor)))
    for src, dst in (("patch_size", "patch_size"), ("spatial_merge_size", "merge_size"),
                     ("temporal_patch_size", "temporal_patch_size")):
        if isinstance(vision.get(src), int):
            pre[dst] = vision[src]
    logger.warning("%s has no preprocessor_config.json: using the %s defaults (patch %s, merge %s); the saved "
                   "model will carry them", name_or_path, model_type, pre.get("patch_size"), pre.get("merge_size"))
    with tempfile.TemporaryDirectory(prefix="vlsft-processor-") as tmp:
        for f in folder.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                (Path(tmp) / f.name).symlink_to(f.resolve())
        (Path(tmp) / "preprocessor_config.json").write_text(json.dumps(pre), encoding="utf-8")
        return AutoProcessor.from_pretrained(tmp)

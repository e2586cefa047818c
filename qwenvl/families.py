"""The model families vlsft trains: one record per ``config.json`` ``model_type`` (torch-free).

Every fact that depends on the family lives in its :class:`Family` record, and every call site asks
:func:`family` (or :func:`family_at` for a model folder) instead of comparing type strings: the one spelling is
``config.json``'s ``model_type`` (``qwen2_5_vl``, ``qwen3_vl_moe`` ...), and an unknown type is a
:class:`ModelTypeError` (one line), never a silent fallback to another family.

What a record says:

* ``model_class`` / ``config_class``: the transformers classes (looked up by name on use);
* ``layout``: how a sample is built - ``"qwen2.5"`` as the official Qwen2.5-era trainer builds it (system prompt,
  ``qwen_vl_utils`` video sampling), ``"head"`` as the official trainer's HEAD builds Qwen3-VL (no system prompt,
  HEAD video sampling, EXIF applied, ``<X.Y seconds>`` per temporal patch);
* ``grounding``: the coordinate convention of boxes and points (:mod:`qwenvl.data.grounding`);
* ``video_time``: the temporal M-RoPE rule (:mod:`qwenvl.data.rope`);
* ``exif``, ``moe``, ``linear_attention``, ``packs``, ``zero3``: what the pipeline applies and what the family can do
  here;
* ``tokenizer``, ``chat_template``, ``processor``, ``video_processor``: what a model folder of the family carries
  (the tiny models of :mod:`qwenvl.tiny` are written from them, and a checkpoint without processor settings gets
  ``processor``);
* ``tiny``: the family's part of the tiny test config (:func:`qwenvl.tiny.tiny_config`);
* ``hub_names``: the hub repository names published as this family (``Qwen2.5-VL-.*``), for a hub id whose
  ``config.json`` is not downloaded yet (:func:`family_from_hub_id`).

Adding a family is one record in :data:`FAMILIES` (plus its chat template in :mod:`qwenvl.templates` if it brings a
new one); tests/test_families.py shows it with a test-only record.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from qwenvl.problems import UserError

#: the parts every parameter belongs to (qwenvl.model.part_of_parameters; LoRA targets name them)
PARTS = ("vision", "merger", "llm")
#: sample layouts: the official Qwen2.5-era builder, or the official HEAD builder (Qwen3-VL)
LAYOUTS = ("qwen2.5", "head")
#: grounding conventions: Qwen2.5-VL absolute pixels of the resized image in JSON; Qwen2-VL 0-1000 inside
#: <|box_start|>(x1,y1),(x2,y2)<|box_end|>; Qwen3-VL 0-1000 in JSON
GROUNDINGS = ("resized-pixels", "box-tokens-1000", "json-1000")
#: temporal M-RoPE: Qwen2-VL counts temporal patches; Qwen2.5-VL scales them to seconds (second_per_grid_ts);
#: Qwen3-VL splits a video into one (1, h, w) grid per temporal patch with a text time stamp between them
VIDEO_TIMES = ("patch-index", "seconds", "frame-split")
#: the model type a tokenizer-only folder (no config.json) is built as (datasets preview --model TOKENIZER_DIR)
TOKENIZER_ONLY_MODEL_TYPE = "qwen2_5_vl"


class ModelTypeError(UserError, ValueError):
    """The model folder is not one of the supported families (one line)."""


def _frozen(d: Mapping | None) -> Mapping | None:
    return None if d is None else MappingProxyType(dict(d))


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type: the one spelling
    title: str  # what people call it ("Qwen2.5-VL")
    model_class: str  # transformers class name
    config_class: str
    layout: str  # LAYOUTS
    grounding: str  # GROUNDINGS
    video_time: str  # VIDEO_TIMES
    exif: bool  # images are turned by their EXIF orientation before resizing
    tokenizer: str  # "qwen2.5" (Qwen2.5-VL's 151,665 tokens) | "qwen3" (the full Qwen3 set, <think> one token)
    chat_template: str  # a key of qwenvl.templates.CHAT_TEMPLATES
    processor: Mapping  # the published preprocessor_config.json
    video_processor: Mapping | None = None  # the published video_preprocessor_config.json, where one exists
    moe: bool = False  # router auxiliary loss (qwenvl.loss) when the config asks for router logits
    linear_attention: bool = False  # Gated DeltaNet layers (packed rows: qwenvl.linear_attention)
    packs: bool = True  # several samples in one row (data_flatten / data_packing) are kept apart
    zero3: bool = True  # loads under DeepSpeed ZeRO-3 with the installed transformers
    tiny: Mapping = field(default_factory=dict)  # {"text": {...}, "vision": {...}, "tie_word_embeddings": ...}
    # hub repository names published as this family (regexes, case-insensitive, any namespace): print-args' guess
    # for a hub id not yet downloaded (family_from_hub_id); the downloaded config.json decides
    hub_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, allowed in (("layout", LAYOUTS), ("grounding", GROUNDINGS), ("video_time", VIDEO_TIMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Family {self.model_type}: {name} {getattr(self, name)!r} is not one of {allowed}")
        for name in ("processor", "video_processor", "tiny"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def head(self) -> bool:
        """Built as the official HEAD builds Qwen3-VL (see the module docstring)."""
        return self.layout == "head"

    @property
    def qwen3_tokenizer(self) -> bool:
        """The full Qwen3 token set (``<think>`` etc.; no ``vision_token_id`` in the config)."""
        return self.tokenizer == "qwen3"

    @property
    def keeps_second_per_grid_ts(self) -> bool:
        """The batch carries ``second_per_grid_ts`` (the model scales video time by it)."""
        return self.video_time == "seconds"

    def batching_problem(self, *, data_flatten: bool, data_packing: bool) -> str | None:
        """Why ``data_flatten`` / ``data_packing`` cannot run for this family here, or None."""
        if self.packs or not (data_flatten or data_packing):
            return None
        which = "data_packing" if data_packing else "data_flatten"
        return (f"{which} puts several samples in one row, and {self.model_type} cannot keep them apart here: use "
                "padded batches (data_flatten False, data_packing False)")

    def deepspeed_problem(self, zero_stage: int | None) -> str | None:
        """Why this family cannot run under this ZeRO stage here, or None.

        Qwen3-VL MoE stores its experts as fused 3-D tensors; transformers 5.24 converts them on load with
        ``Transpose(check_dims=True)``, which compares against the parameter's shape - under ZeRO-3 that is the
        partitioned placeholder, so every expert tensor is transposed ("size mismatch for
        ...mlp.experts.down_proj", or silently transposed square experts). The official HEAD scripts train it with
        ZeRO-2 ("MoE model only supports zero2")."""
        if self.zero3 or zero_stage != 3:
            return None
        return (f"{self.model_type} cannot be trained with DeepSpeed ZeRO-3 here: transformers 5.24 transposes its "
                "fused expert weights while loading them into ZeRO-3 partitions (size mismatch for "
                "mlp.experts.down_proj); use ZeRO-2 (distributed.deepspeed: zero2 / --deepspeed configs/zero2.json), "
                "as the official sft_30a3b.sh does")

    def limits(self) -> list[str]:
        """What this family cannot do in this environment, one short phrase each (print-args shows them)."""
        out = []
        if self.batching_problem(data_flatten=False, data_packing=True):
            out.append("no data.packing / data.flatten (padded rows only)")
        if self.deepspeed_problem(3):
            out.append("no ZeRO-3 (transformers 5.24 mis-loads its fused experts; ZeRO-2 as the official scripts)")
        return out


# ---------------------------------------------------------------------------------------------------- the records
_QWEN25_PROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
}
#: the published Qwen3-VL files (Qwen/Qwen3-VL-2B/4B-Instruct); Qwen3.5 ships the same image settings
_QWEN3_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
_QWEN3_VIDEO_PROCESSOR = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}
_QWEN3_VISION = {"patch_size": 16, "out_hidden_size": 64, "num_position_embeddings": 256}
_QWEN3_COMMON = dict(layout="head", grounding="json-1000", video_time="frame-split", exif=True, tokenizer="qwen3",
                     chat_template="qwen3-vl", processor=_QWEN3_PROCESSOR, video_processor=_QWEN3_VIDEO_PROCESSOR)
_QWEN35_TEXT = {"head_dim": 16, "layer_types": ["linear_attention", "full_attention"], "linear_conv_kernel_dim": 4,
                "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
                "linear_num_value_heads": 4,
                "rope_parameters": {**_MROPE, "rope_theta": 1e7, "mrope_interleaved": True,
                                    "partial_rotary_factor": 1.0}}
#: the Qwen3.5 architecture (Qwen3.5, 3.6, 3.8 checkpoints): the Qwen3-VL media rules, the Qwen3.5 chat template (a
#: model folder carrying the Qwen3.6 or Qwen3.8 one is rendered as that: qwenvl.templates.choices / rendering_of)
_QWEN35_COMMON = {**_QWEN3_COMMON, "chat_template": "qwen3.5"}
_ACTIVE = r"-A\d+(\.\d+)?B\b.*"  # a MoE's active parameters in its hub name: Qwen3-VL-30B-A3B-Instruct
_MOE_TEXT = {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
             "router_aux_loss_coef": 0.001}

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration", "Qwen2VLConfig", layout="qwen2.5",
           grounding="box-tokens-1000", video_time="patch-index", exif=False, tokenizer="qwen2.5",
           chat_template="qwen2.5-vl", processor={**_QWEN25_PROCESSOR, "processor_class": "Qwen2VLProcessor"},
           tiny={"text": {"rope_parameters": {**_MROPE, "rope_theta": 1e6}},
                 "vision": {"intermediate_size": None, "embed_dim": 32, "mlp_ratio": 2, "hidden_size": 64},
                 "tie_word_embeddings": False}, hub_names=(r"Qwen2-VL-.+", r"QVQ-.+")),
    Family("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", layout="qwen2.5",
           grounding="resized-pixels", video_time="seconds", exif=False, tokenizer="qwen2.5",
           chat_template="qwen2.5-vl", processor=_QWEN25_PROCESSOR,
           tiny={"text": {"rope_parameters": {**_MROPE, "rope_theta": 1e6}},
                 "vision": {"window_size": 112, "out_hidden_size": 64, "fullatt_block_indexes": [1],
                            "tokens_per_second": 2}}, hub_names=(r"Qwen2\.5-VL-.+",)),
    Family("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration", "Qwen3VLConfig", **_QWEN3_COMMON,
           tiny={"text": {"head_dim": 16, "rope_parameters": {**_MROPE, "rope_theta": 5e6, "mrope_interleaved": True}},
                 "vision": {**_QWEN3_VISION, "deepstack_visual_indexes": [1]}}, hub_names=(r"Qwen3-VL-.+",)),
    Family("qwen3_vl_moe", "Qwen3-VL MoE", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig",
           **_QWEN3_COMMON, moe=True, zero3=False,
           tiny={"text": {"head_dim": 16, **_MOE_TEXT, "decoder_sparse_step": 1,
                          "rope_parameters": {**_MROPE, "rope_theta": 5e6, "mrope_interleaved": True}},
                 "vision": {**_QWEN3_VISION, "deepstack_visual_indexes": [1]}}, hub_names=(rf"Qwen3-VL-.+{_ACTIVE}",)),
    Family("qwen3_5", "Qwen3.5", "Qwen3_5ForConditionalGeneration", "Qwen3_5Config", **_QWEN35_COMMON,
           linear_attention=True, tiny={"text": _QWEN35_TEXT, "vision": _QWEN3_VISION},
           hub_names=(r"Qwen3\.[5-9]-.+",)),
    Family("qwen3_5_moe", "Qwen3.5 MoE", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeConfig",
           **_QWEN35_COMMON, moe=True, linear_attention=True,
           tiny={"text": {**_QWEN35_TEXT, **_MOE_TEXT, "shared_expert_intermediate_size": 32,
                          "intermediate_size": None},
                 "vision": _QWEN3_VISION}, hub_names=(rf"Qwen3\.[5-9]-.+{_ACTIVE}",)),
)}


def supported() -> str:
    return ", ".join(FAMILIES)


def family(model_type: str | Family) -> Family:
    """The record of ``model_type`` (config.json's spelling); a :class:`ModelTypeError` for any other value."""
    if isinstance(model_type, Family):
        return model_type
    try:
        return FAMILIES[model_type]
    except (KeyError, TypeError):
        raise ModelTypeError(f"model_type {model_type!r} is not supported; supported: {supported()}") from None


def read_model_type(name_or_path: str | os.PathLike) -> str:
    """``model_type`` from ``<path>/config.json`` (a local folder), checked against :data:`FAMILIES`."""
    cfg = Path(name_or_path) / "config.json"
    if not cfg.is_file():
        raise ModelTypeError(
            f"{name_or_path}: no config.json; model_name_or_path must be a local model folder "
            "(download it first, e.g. `hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir ...`)"
        )
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelTypeError(f"{cfg}: unreadable ({e}); restore the model's config.json") from e
    model_type = data.get("model_type") if isinstance(data, dict) else None
    if model_type not in FAMILIES:
        raise ModelTypeError(f"{cfg}: model_type {model_type!r} is not supported; supported: {supported()}")
    return model_type


def family_from_hub_id(repo_id: str) -> Family | None:
    """The family a hub id's name says (``Qwen/Qwen3-VL-30B-A3B-Instruct`` -> Qwen3-VL MoE) by the records'
    ``hub_names`` (any namespace, case-insensitive; the longest matching pattern wins, so a MoE's ``...-A3B...``
    beats the dense family's ``Qwen3-VL-.+``); None for a name no record claims. A guess made before the download,
    for print-args: the downloaded config.json's model_type decides."""
    name = repo_id.rsplit("/", 1)[-1]
    found = [(len(p), f) for f in FAMILIES.values() for p in f.hub_names if re.fullmatch(p, name, flags=re.IGNORECASE)]
    return max(found, key=lambda t: t[0])[1] if found else None


def family_at(folder: str | os.PathLike) -> Family:
    """The family of a model folder: its ``config.json``, or for a LoRA folder (``adapter_config.json``) the
    ``config.json`` of the base model it names."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "adapter_config.json").is_file():
        try:
            base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelTypeError(f"{folder / 'adapter_config.json'}: no readable base_model_name_or_path ({e}); "
                                 "restore the adapter folder as vlsft train wrote it") from e
        folder = Path(str(base))
    return family(read_model_type(folder))

"""Will it fit? GPU memory per rank for a planned run, before anything starts (torch-free).

``print-args`` calls :func:`estimate` with what the plan knows: the model folder (tensor shapes from the
safetensors headers, dimensions from ``config.json``), which parts train in full or through LoRA / QLoRA, the
precision, the DeepSpeed stage and offload, the world size, the row length and rows per step, activation
checkpointing and the image budget. The result is one :class:`MemoryEstimate`: named terms in bytes, their sum,
and the biggest one.

Static terms - exact for the paths that keep them in one place (tests/test_memory.py measures the real tensors
of a tiny model: parameters, gradients and AdamW states after one optimizer step):

* **weights**: every parameter at the load precision (bf16/fp16 2 bytes, fp32 4); QLoRA's 4-bit / 8-bit language
  model linears 0.5 / 1 byte plus the quantization constants (bitsandbytes: one fp32 absmax per 64 weights);
  ZeRO-3 divides them over the ranks.
* **gradients**: one per trained value at the parameter's precision; ZeRO-2/3 divide them.
* **optimizer**: without DeepSpeed, AdamW's two moments at the parameter's precision plus a 4-byte step per
  trained tensor (transformers' Trainer, torch's AdamW); with DeepSpeed, fp32 master weights and fp32 moments
  (12 bytes per trained value), divided over the ranks at every stage, and on the CPU with ``offload_optimizer``.
* LoRA adapters: PEFT creates them at the base layer's precision; they count as trained values (two tensors per
  adapted layer, three with DoRA).

Activation terms - an analytic model with the constants stated below, checked against the GPU points recorded in
``benchmarks/RESULTS.md`` (the README gives the error):

* with activation checkpointing, each decoder layer keeps its input (``tokens x hidden``) and one layer is live at
  a time; without it every layer keeps its working set;
* one layer's working set: ``tokens x (ATTN_FACTOR x hidden + MLP_FACTOR x intermediate)`` values;
* the loss: vlsft's chunked head keeps at most :data:`qwenvl.loss.CHUNK_BYTES` of fp32 logits (x3: logits,
  softmax, gradient) and the hidden states of the trained tokens;
* the vision tower: the image patches of a step at the vision width; a frozen tower runs forward-only (one block
  live), a trained one keeps every block's input;
* :data:`RUNTIME_OVERHEAD`: CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's slack.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

GIB = 2**30
ATTN_FACTOR = 12  # values per token per unit of hidden size live in one attention block (q, k, v, o, norms, ...)
MLP_FACTOR = 4  # values per token per unit of intermediate size in one SwiGLU MLP (gate, up, act, product)
VISION_BLOCK_FACTOR = 16  # per patch per unit of vision width in one vision block (attention + MLP together)
LOSS_CHUNK_BYTES = 512 * 2**20  # qwenvl.loss.CHUNK_BYTES (kept equal by tests/test_memory.py)
RUNTIME_OVERHEAD = int(2.5 * GIB)
STOCK_LOSS_FP32_COPIES = 2  # transformers' loss: the fp32 upcast of the logits and the log-softmax it keeps


@dataclass
class MemoryEstimate:
    terms: dict[str, int] = field(default_factory=dict)  # name -> bytes per GPU
    cpu_terms: dict[str, int] = field(default_factory=dict)  # what offload moves to host memory
    setup: Setup | None = None  # what it was computed for

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def biggest(self) -> str:
        """The largest term a setting can change (the fixed runtime overhead is not one)."""
        terms = {k: v for k, v in self.terms.items() if k != "runtime"}
        return max(terms, key=terms.get) if terms else ""

    def lines(self) -> list[str]:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in self.terms.items() if v >= 0.05 * GIB)
        out = [f"GPU memory per rank ~ {self.total / GIB:.1f} GiB ({parts} GiB; estimate, see docs/training.md)"]
        if self.cpu_terms:
            out.append("host memory per rank ~ " + ", ".join(f"{k} {v / GIB:.1f} GiB" for k, v in self.cpu_terms.items()))
        return out


@dataclass(frozen=True)
class Dims:
    """What the activation model reads from ``config.json``."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_depth: int
    patch: int
    merge: int

    @classmethod
    def from_config(cls, cfg: dict) -> Dims:
        text = cfg.get("text_config") or cfg
        vision = cfg.get("vision_config") or {}
        inter = text.get("intermediate_size") or text.get("moe_intermediate_size") or 4 * int(text["hidden_size"])
        return cls(int(text["hidden_size"]), int(inter), int(text["num_hidden_layers"]),
                   int(text.get("vocab_size") or cfg.get("vocab_size") or 151936),
                   int(vision.get("hidden_size") or vision.get("embed_dim") or 1280),
                   int(vision.get("depth") or 32), int(vision.get("patch_size") or 14),
                   int(vision.get("spatial_merge_size") or 2))


@dataclass(frozen=True)
class Setup:
    """The run, as the plan knows it."""

    bytes_per_value: int = 2  # bf16 / fp16: 2, fp32: 4
    zero_stage: int | None = None  # None: no DeepSpeed
    offload_optimizer: bool = False
    offload_param: bool = False
    world_size: int = 1
    quantize: str | None = None  # "4bit" | "8bit" (QLoRA)
    tokens: int = 8192  # text tokens per rank per micro-step (the longest rows the data can make)
    trained_tokens: int | None = None  # tokens with a label (default: all)
    image_patches: int = 0  # vision patches per rank per micro-step
    checkpointing: bool = True
    vision_trains: bool = False
    chunked_loss: bool = True  # vlsft's loss head; False: transformers' stock loss (full logits, calibration)


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape) if shape else 1


def static_terms(shapes: dict[str, list[int]], trained: dict[str, bool], setup: Setup, *, lora_values: int = 0,
                 lora_tensors: int = 0, quantized: set[str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
    """``(GPU terms, host terms)`` of weights, gradients and optimizer states. ``trained[key]``: the saved tensor
    trains in full; ``lora_values`` / ``lora_tensors``: the adapters (they train too); ``quantized``: keys QLoRA
    stores quantized."""
    b, ws, stage = setup.bytes_per_value, max(1, setup.world_size), setup.zero_stage
    quantized = quantized or set()
    qbytes = {"4bit": 0.5, "8bit": 1.0}.get(setup.quantize or "", 0.0)
    weights = lora_values * b
    trained_values = lora_values
    trained_tensors = lora_tensors
    for key, shape in shapes.items():
        n = _numel(shape)
        if key in quantized and qbytes:
            weights += int(n * qbytes) + 4 * math.ceil(n / 64)
        else:
            weights += n * b
        if trained.get(key):
            trained_values += n
            trained_tensors += 1
    gpu: dict[str, int] = {}
    host: dict[str, int] = {}
    gpu["weights"] = weights // ws if stage == 3 and not setup.offload_param else weights
    if stage == 3 and setup.offload_param:
        gpu["weights"], host["weights"] = 0, weights // ws
    grads = trained_values * b
    gpu["gradients"] = grads // ws if stage in (2, 3) else grads
    if stage is None:
        gpu["optimizer"] = trained_values * 2 * b + 4 * trained_tensors
    else:
        states = trained_values * 12 // ws  # fp32 master weights + two fp32 moments, partitioned
        if setup.offload_optimizer:
            gpu["optimizer"], host["optimizer"] = 0, states
        else:
            gpu["optimizer"] = states
    return gpu, host


def activation_terms(dims: Dims, setup: Setup) -> dict[str, int]:
    b, n = setup.bytes_per_value, max(1, setup.tokens)
    layer = n * (ATTN_FACTOR * dims.hidden + MLP_FACTOR * dims.intermediate) * b
    if setup.checkpointing:
        text = dims.layers * n * dims.hidden * b + layer
    else:
        text = dims.layers * layer
    trained = n if setup.trained_tokens is None else setup.trained_tokens
    if setup.chunked_loss:
        rows = max(64, LOSS_CHUNK_BYTES // (4 * dims.vocab))
        loss = 3 * min(rows, trained) * dims.vocab * 4 + trained * dims.hidden * (4 + b)
    else:  # every position's logits at the model precision, their fp32 copy, log-softmax and its gradient
        loss = n * dims.vocab * (b + STOCK_LOSS_FP32_COPIES * 4)
    out = {"activations": text, "loss": loss}
    if setup.image_patches:
        per_block = setup.image_patches * VISION_BLOCK_FACTOR * dims.vision_hidden * b
        keep = dims.vision_depth * setup.image_patches * dims.vision_hidden * b if setup.vision_trains else 0
        out["vision"] = per_block + keep
    out["runtime"] = RUNTIME_OVERHEAD
    return out


def estimate(model_dir: str | os.PathLike, *, setup: Setup, tune: dict[str, bool], lora=None, r: int = 64,
             use_dora: bool = False) -> MemoryEstimate:
    """The estimate for a model folder (``tune``: part -> trained in full; ``lora``: a
    :class:`qwenvl.lora_rules.LoraPlan` or None). Raises ``FileNotFoundError`` / ``ValueError`` when the folder
    has no readable weights or config."""
    from qwenvl.lora_rules import is_linear_weight, linear_module_matches, runtime_name, saved_part, weight_shapes

    shapes = weight_shapes(model_dir)
    if not shapes:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    full = set(lora.full) if lora is not None else {p for p, on in tune.items() if on}
    trained = {k: saved_part(k) in full for k in shapes}
    lora_values, lora_tensors, quantized = 0, 0, set()
    for key, shape in shapes.items():
        part = saved_part(key)
        if lora is not None and part not in full and is_linear_weight(key, shape):
            if linear_module_matches(runtime_name(key)[: -len(".weight")], part, lora):
                lora_values += r * (int(shape[0]) + int(shape[1])) + (int(shape[0]) if use_dora else 0)
                lora_tensors += 3 if use_dora else 2
        if setup.quantize and part == "llm" and is_linear_weight(key, shape) and part not in full:
            quantized.add(key)
    gpu, host = static_terms(shapes, trained, setup, lora_values=lora_values, lora_tensors=lora_tensors,
                             quantized=quantized)
    gpu.update(activation_terms(Dims.from_config(cfg), setup))
    return MemoryEstimate(gpu, host, setup)


#: the estimate may exceed the GPU by this fraction before a run is refused (its error on the recorded GPU points
#: is +2 % .. +6 %, an over-estimate: docs/training.md)
TOLERANCE = 0.10


def refusal(est: MemoryEstimate, gpu_bytes: int) -> str | None:
    """One line when the estimate does not fit ``gpu_bytes`` (beyond :data:`TOLERANCE`): the total, the biggest
    term, what would make it fit."""
    if est.total <= gpu_bytes * (1 + TOLERANCE):
        return None
    big = est.biggest
    return (f"this run needs ~{est.total / GIB:.1f} GiB per GPU and the GPU has {gpu_bytes / GIB:.1f} GiB: the "
            f"biggest term is {big} ({est.terms[big] / GIB:.1f} GiB); {fit_hint(est, est.setup or Setup())}")


def fit_hint(est: MemoryEstimate, setup: Setup) -> str:
    """What would make it fit, for the biggest term."""
    big = est.biggest
    if big in ("optimizer", "gradients", "weights"):
        if setup.zero_stage in (None, 1, 2) and setup.world_size > 1:
            return "use DeepSpeed ZeRO-3 (distributed.deepspeed: zero3) to divide it over the ranks, or LoRA"
        if setup.zero_stage == 3 and not setup.offload_optimizer:
            return "offload the optimizer to the CPU (distributed.deepspeed: zero3_offload), or LoRA"
        return "train fewer parts (tune_mm_llm false + LoRA), or more GPUs with ZeRO-3"
    if big in ("activations", "vision"):
        how = "" if setup.checkpointing else "turn on training.gradient_checkpointing, or "
        return f"{how}use shorter rows (data.model_max_length) or fewer samples / rows per step"
    return "use shorter rows (data.model_max_length) or fewer samples per step"


def parse_size(text: str) -> int:
    """``80GiB`` / ``80GB`` / ``81920MiB`` / ``80G`` -> bytes; a bare number is GiB (a GPU's memory is never a
    few bytes). ValueError for anything else, for sizes that are not positive and finite, or above 1 PiB."""
    t = str(text).strip().replace(" ", "")
    units = {"tib": 2**40, "gib": 2**30, "mib": 2**20, "tb": 10**12, "gb": 10**9, "mb": 10**6, "g": 2**30}
    number, scale = t, 2**30
    for unit in sorted(units, key=len, reverse=True):
        if t.lower().endswith(unit):
            number, scale = t[: -len(unit)], units[unit]
            break
    value = float(number) * scale
    if not 0 < value <= 2**50:  # NaN, inf, zero, negative and absurd sizes alike
        raise ValueError(f"not a GPU memory size: {text}")
    return int(value)

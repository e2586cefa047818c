"""Vision-tower attention in one call per layer, and frozen vision blocks that cost a forward only.

Why: transformers' non-flash path of the Qwen2-VL / Qwen2.5-VL / Qwen3-VL (and Qwen3.5) vision attention splits
q/k/v by ``cu_seqlens`` with a ``.tolist()`` host sync in every layer and calls attention once per window or image:
~250 calls per layer on a realistic step of the Qwen2.5-VL-3B geometry, 15,976 forward calls per step (measured on
an H200, ``benchmarks/RESULTS.md``). The step was launch-bound.

What this module does (:func:`install`, called by the trainer, ``benchmarks/`` and ``qwenvl.infer`` right after the
model is loaded):

* **One attention call per layer.** The vision config's attention implementation is set to :data:`VISION_ATTENTION`,
  a function registered in transformers' ``AttentionInterface``. Its name contains ``flash``, so the stock vision
  attention takes its variable-length branch and hands over ``cu_seqlens`` and ``max_seqlen`` once for all windows
  and images (transformers computes ``max_seqlen`` once per forward, not per layer). The function then runs

  - on CUDA in bf16/fp16, PyTorch's own variable-length attention (``torch.nn.attention.varlen.varlen_attn``)
    when the installed torch has it: one kernel over every window/image, no padding;
  - otherwise one batched ``scaled_dot_product_attention`` call per length group: the sequences are gathered into a
    padded ``[groups, heads, L, head_dim]`` batch with a key-padding mask. With very different lengths (the
    full-attention layers over images of many sizes) the sequences are split in two groups at the length that
    wastes the least compute, so a layer costs at most 2 calls whatever the number of windows and images.

  The gather/scatter indices are computed once per distinct ``cu_seqlens`` tensor (transformers builds one for the
  windows and one for the full layers per forward) and reused by every layer: no host sync per layer.
  When ``flash_attention_2`` (flash-attn) is requested the model is left as it is: transformers then already runs
  its variable-length kernel.
* **The language model with packing** (:func:`install_text`, sdpa-loaded models): packed and flattened rows carry
  the collator's ``cu_seq_lens_q`` over the flattened rows; on CUDA in bf16/fp16 with ``varlen_attn`` they run as
  one causal variable-length call per layer instead of sdpa over a tokens x tokens block-diagonal mask (which
  computes every cross-sample block and forces the masked kernel). Everything else - CPU, fp32, padded batches -
  is transformers' own sdpa function, unchanged; masks are built as for sdpa.
* **Frozen vision blocks cost a forward only** (:func:`forward_only_frozen_blocks`): the leading vision blocks that
  hold no trainable parameter (``tune_mm_vision: false`` and no LoRA adapter in them) run under ``torch.no_grad``,
  bypassing activation checkpointing: no recompute and no backward through them (``enable_input_require_grads``
  otherwise makes the frozen tower back-propagate). Gradients of every trained parameter are unchanged: nothing
  upstream of those blocks trains.

Saved checkpoints are unaffected: ``config.json`` keeps the implementation the model was loaded with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: the name registered in transformers' AttentionInterface ("flash" in it selects the variable-length branch)
VISION_ATTENTION = "vlsft_flash_varlen_vision"
#: the language model's (sdpa everywhere except packed rows on CUDA: one causal variable-length kernel)
TEXT_ATTENTION = "vlsft_varlen_text"
#: attention implementations we replace in the vision tower (flash-attn's own are left alone)
REPLACED = (None, "sdpa", "eager")


@dataclass(frozen=True)
class _Group:
    index: object  # [B, L] long: token positions of each sequence (padding points at position 0)
    valid: object  # [B, 1, 1, L] bool: key mask
    flat: object  # [n_tokens_in_group] long: where the group's tokens sit in its flattened [B * L] output


@dataclass(frozen=True)
class _Plan:
    groups: tuple
    order: object  # [S] long: for output token t, its row in the concatenated group outputs (None = identity)


_PLANS: dict[int, tuple[object, _Plan]] = {}  # id(cu_seqlens) -> (the tensor, kept alive; its plan)
_MAX_PLANS = 8
_COUNTS = {"calls": 0, "plans": 0, "text_varlen": 0}


def stats() -> dict[str, int]:
    """Calls of the vision attention function and plans built since the last :func:`reset_stats` (for tests)."""
    return dict(_COUNTS)


def reset_stats() -> None:
    _COUNTS.clear()
    _COUNTS.update(calls=0, plans=0, text_varlen=0)
    _PLANS.clear()


def split_point(lengths: list[int]) -> int:
    """Index ``k`` into the sorted lengths where a split into ``[:k]`` and ``[k:]`` wastes the least attention
    compute (sum over groups of ``n x L_max^2``); ``len(lengths)`` (one group) when splitting does not pay."""
    s = sorted(lengths)
    n = len(s)
    best_k, best = n, n * s[-1] ** 2 if n else 0
    for k in range(1, n):
        cost = k * s[k - 1] ** 2 + (n - k) * s[-1] ** 2
        if cost < best * 0.8:  # a second call must save at least a fifth of the work
            best_k, best = k, cost
    return best_k


def _build_plan(cu_seqlens, device) -> _Plan:
    import torch

    cu = [int(x) for x in cu_seqlens.tolist()]  # the one host sync, once per cu_seqlens tensor per forward
    spans = [(a, b - a) for a, b in zip(cu[:-1], cu[1:], strict=False) if b > a]
    total = cu[-1] - cu[0] if cu else 0
    k = split_point([n for _, n in spans]) if spans else 0
    by_len = sorted(range(len(spans)), key=lambda i: spans[i][1])
    chosen = [by_len[:k], by_len[k:]] if 0 < k < len(spans) else [list(range(len(spans)))]
    groups = []
    order = [0] * total
    row = 0
    for members in chosen:
        members = sorted(members)  # keep token order inside a group
        width = max(spans[i][1] for i in members)
        index = torch.zeros(len(members), width, dtype=torch.long)
        valid = torch.zeros(len(members), width, dtype=torch.bool)
        flat = []
        for b, i in enumerate(members):
            start, n = spans[i]
            index[b, :n] = torch.arange(start, start + n)
            valid[b, :n] = True
            order[start - cu[0]:start - cu[0] + n] = range(row + len(flat), row + len(flat) + n)
            flat.extend(range(b * width, b * width + n))
        row += len(flat)
        groups.append(_Group(index.to(device), valid.view(len(members), 1, 1, width).to(device),
                             torch.tensor(flat, dtype=torch.long, device=device)))
    identity = len(groups) == 1 and cu[0] == 0
    _COUNTS["plans"] += 1
    return _Plan(tuple(groups), None if identity else torch.tensor(order, dtype=torch.long, device=device))


def _plan_for(cu_seqlens, device) -> _Plan:
    key = id(cu_seqlens)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is cu_seqlens:
        return hit[1]
    plan = _build_plan(cu_seqlens, device)
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = (cu_seqlens, plan)
    return plan


def _torch_varlen():
    """PyTorch's variable-length attention (CUDA only), or None where the installed torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def route(query) -> str:
    """Which kernel the vision attention uses for this query tensor: ``varlen`` or ``padded_sdpa``."""
    import torch

    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16) and _torch_varlen() is not None:
        return "varlen"
    return "padded_sdpa"


def padded_sdpa(q, k, v, cu_seqlens, scaling: float):
    """Non-causal attention inside each ``cu_seqlens`` span of ``q/k/v`` (``[S, H, D]``), as at most two batched
    ``scaled_dot_product_attention`` calls; returns ``[S, H, D]``."""
    import torch
    import torch.nn.functional as F

    plan = _plan_for(cu_seqlens, q.device)
    outs = []
    for g in plan.groups:
        b, width = g.index.shape
        qb, kb, vb = (t[g.index].permute(0, 2, 1, 3) for t in (q, k, v))  # [B, H, L, D]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=g.valid, scale=scaling)
        o = o.permute(0, 2, 1, 3).reshape(b * width, q.shape[1], q.shape[2])
        outs.append(o.index_select(0, g.flat))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
    return out if plan.order is None else out.index_select(0, plan.order)


def _varlen_kwargs(scale: float, head_dim: int, *, causal: bool) -> dict | None:
    """Keyword arguments for the installed torch's ``varlen_attn`` (its signature moved between releases: causality
    as ``is_causal`` or ``window_size=(-1, 0)``), or None when it cannot express this call."""
    import inspect

    fn = _torch_varlen()
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    kw: dict = {}
    if causal:
        if "is_causal" in params:
            kw["is_causal"] = True
        elif "window_size" in params:
            kw["window_size"] = (-1, 0)
        else:
            return None
    if "scale" in params:
        kw["scale"] = scale
    elif abs(scale - head_dim ** -0.5) > 1e-12:
        return None
    if "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def _repeat_heads(t, n_heads: int):
    """``[T, H_kv, D]`` -> ``[T, n_heads, D]`` (grouped-query attention for a kernel without ``enable_gqa``)."""
    return t if t.shape[1] == n_heads else t.repeat_interleave(n_heads // t.shape[1], dim=1)


def varlen(q, k, v, cu_seqlens, max_len: int, scale: float, *, causal: bool):
    """``varlen_attn`` over ``[T, H, D]`` tensors split by ``cu_seqlens`` (int32), or None where the installed
    torch cannot run it."""
    kw = _varlen_kwargs(scale, q.shape[-1], causal=causal)
    if kw is None:
        return None
    if "enable_gqa" not in kw:
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    import torch

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return _torch_varlen()(q, k, v, cu, cu, int(max_len), int(max_len), **kw)


def vision_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, *,
                     cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers attention-interface function for the vision tower (inputs ``[1, H, S, D]``, returns
    ``([1, S, H, D], None)``)."""
    if cu_seq_lens_q is None:
        raise RuntimeError("vlsft vision attention needs cu_seqlens (it serves the Qwen VL vision towers only)")
    _COUNTS["calls"] += 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [S, H, D]
    out = None
    if route(q) == "varlen":
        m = max_length_q if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        out = varlen(q, k, v, cu_seq_lens_q, m, scale, causal=False)
    if out is None:
        out = padded_sdpa(q, k, v, cu_seq_lens_q, scale)
    return out.unsqueeze(0), None


def text_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The language model's attention: packed / flattened rows (the collator's ``cu_seq_lens_q`` over the
    flattened rows) run as one causal variable-length kernel on CUDA where torch has one - no tokens x tokens
    mask; everything else (CPU, padded batches, fp32, dropout) is transformers' sdpa path unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    b, h, n, d = query.shape
    if (cu is not None and dropout == 0.0 and route(query) == "varlen" and int(cu.shape[0]) >= 2
            and kwargs.get("max_length_q") is not None):
        scale = scaling if scaling is not None else d ** -0.5
        q, k, v = (t.transpose(1, 2).reshape(b * n, t.shape[1], d) for t in (query, key, value))
        out = varlen(q, k, v, cu, kwargs["max_length_q"], scale, causal=True) if _covers(cu, b * n) else None
        if out is not None:
            _COUNTS["text_varlen"] += 1
            return out.reshape(b, n, h, d), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                  **kwargs)


def _covers(cu, tokens: int) -> bool:
    """cu_seqlens span exactly the flattened rows (the collator's contract; the last entry is known on the host
    from the batch's shape, so this check costs one scalar read per step, cached per tensor)."""
    key = ("covers", id(cu))
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is cu:
        return hit[1]
    ok = int(cu[0]) == 0 and int(cu[-1]) == tokens
    _PLANS[key] = (cu, ok)
    return ok


def _register() -> bool:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.utils.generic import is_flash_attention_requested

    if not is_flash_attention_requested(requested_attention_implementation=VISION_ATTENTION):
        return False  # this transformers picks the variable-length branch differently: keep the stock path
    AttentionInterface.register(VISION_ATTENTION, vision_attention)
    AttentionInterface.register(TEXT_ATTENTION, text_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TEXT_ATTENTION, sdpa_mask)  # masks built exactly as for sdpa
    return True


def install_text(model) -> bool:
    """Route the language model's attention through :func:`text_attention` (sdpa-loaded models only)."""
    text_cfg = getattr(getattr(model, "config", None), "text_config", None)
    if text_cfg is None or getattr(text_cfg, "_attn_implementation", None) not in ("sdpa", TEXT_ATTENTION):
        return False
    if not _register():
        return False
    text_cfg._attn_implementation = TEXT_ATTENTION
    return True


def _vision_tower(model):
    m = model
    for _ in range(4):  # PEFT wrapper -> base model -> ForConditionalGeneration -> inner model
        visual = getattr(m, "visual", None)
        if visual is not None:
            return visual
        inner = getattr(m, "model", None) or getattr(m, "base_model", None)
        if inner is None or inner is m:
            break
        m = inner
    return None


def install(model) -> bool:
    """Route the vision tower's attention through :func:`vision_attention` (one call per layer); True when done.
    A model loaded with flash-attn's implementation, or one without a Qwen VL vision tower, is left as it is."""
    visual = _vision_tower(model)
    if visual is None:
        return False
    cfg = visual.config
    current = getattr(cfg, "_attn_implementation", None)
    if current == VISION_ATTENTION:
        return True
    if current not in REPLACED or not _register():
        return False
    cfg._attn_implementation = VISION_ATTENTION
    for module in visual.modules():  # sub-modules holding their own config object (none in 5.24; be sure)
        sub = getattr(module, "config", None)
        if sub is not None and sub is not cfg and getattr(sub, "_attn_implementation", None) in REPLACED:
            sub._attn_implementation = VISION_ATTENTION
    logger.info("vision attention: one call per layer (%s, was %s)", VISION_ATTENTION, current)
    return True


# ---- frozen blocks: a forward only -------------------------------------------------------------------------------

_NO_GRAD_CLASSES: dict[type, type] = {}


def _no_grad_call(self, *args, **kwargs):
    import torch
    from torch import nn

    with torch.no_grad():
        return nn.Module.__call__(self, *args, **kwargs)  # skips GradientCheckpointingLayer's checkpoint wrapper


def subclass_once(cache: dict, cls: type, members: dict) -> type:
    """``cls`` with ``members`` overridden: one subclass per class (same name and module, so reprs, pickling and
    state-dict keys are unchanged), built once and kept in ``cache``; a module is switched to it by class swap."""
    sub = cache.get(cls)
    if sub is None:
        sub = cache[cls] = type(cls.__name__, (cls,), {**members, "__module__": cls.__module__})
    return sub


def _no_grad_class(cls: type) -> type:
    return subclass_once(_NO_GRAD_CLASSES, cls, {"__call__": _no_grad_call, "_vlsft_forward_only": True})


def forward_only_frozen_blocks(model) -> int:
    """Run the leading vision blocks that hold no trainable parameter without autograd; returns how many.

    The vision tower's patch/position embeddings feed block 0, so when blocks ``0..k-1`` are frozen nothing before
    them trains either (they are part ``vision`` too, frozen with the blocks by ``tune_mm_vision``)."""
    visual = _vision_tower(model)
    blocks = getattr(visual, "blocks", None) if visual is not None else None
    if blocks is None:
        return 0
    embed_trains = any(p.requires_grad for name, p in visual.named_parameters()
                       if not name.startswith(("blocks.", "merger", "deepstack_merger")))
    if embed_trains:
        return 0
    n = 0
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        if not getattr(type(block), "_vlsft_forward_only", False):
            block.__class__ = _no_grad_class(type(block))
        n += 1
    if n:
        logger.info("vision tower: %d of %d blocks frozen, run forward-only (no backward, no recompute)", n,
                    len(blocks))
    return n


def prepare_for_training(model) -> dict:
    """The speed-ups (and the packed-row path of linear attention) for a model about to train, after freezing
    and LoRA: returns what was done."""
    from qwenvl import linear_attention

    return {"vision_attention": install(model), "text_attention": install_text(model),
            "forward_only_vision_blocks": forward_only_frozen_blocks(model),
            "linear_attention_layers": linear_attention.install(model)}

"""Packed rows for the linear-attention (Gated DeltaNet) layers of Qwen3.5 / Qwen3.5 MoE: samples kept apart.

Why: a Gated DeltaNet layer carries two kinds of state along the sequence - the short causal convolution over
the last ``linear_conv_kernel_dim`` tokens and the recurrent ``k x v`` state of the delta rule. In a packed row
(several samples back to back, ``data_packing`` / ``data_flatten``) both must restart at every sample boundary,
or sample B reads the end of sample A. transformers 5.24 passes the boundaries (``cu_seq_lens_q``) only to
flash-linear-attention's kernel, and its PyTorch path refuses them (and its convolution ignores them in any
case); peers train such rows with leaks (see the issue). Here:

* the convolution is the same depthwise causal filter written as ``kernel`` shifted copies, each multiplied by
  "this tap lies inside the token's own sample" (position-in-sample >= shift): no tap crosses a boundary, on any
  device, in one pass over the row;
* the delta rule runs once per layer: with flash-linear-attention on CUDA through its variable-length kernel
  (``cu_seqlens``); elsewhere through transformers' own chunked PyTorch rule on the samples laid out as a padded
  batch (each sample from position 0 of its own row, zero-padded at its end - causal, so padding reaches no
  real token - then gathered back), which starts every sample from a zero state exactly as a run of that sample
  alone does, including samples longer than a chunk.

One class swap per layer (``install``), done by :func:`qwenvl.attention.prepare_for_training`; batches without
boundaries (padded rows, generation with a cache) take transformers' own forward unchanged. Exact against one
sample at a time in fp32 (tests/test_linear_attention.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from itertools import pairwise

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

_CLASSES: dict[type, type] = {}
_LAYOUTS: dict[int, tuple[object, object]] = {}  # id(cu_seqlens) -> (the tensor, kept alive; its layout)
_MAX_LAYOUTS = 8
_COUNTS = {"packed_calls": 0, "layouts": 0}


def stats() -> dict[str, int]:
    return dict(_COUNTS)


def reset_stats() -> None:
    for k in _COUNTS:
        _COUNTS[k] = 0
    _LAYOUTS.clear()


class _Layout:
    """Where each token of the flattened row sits: its position inside its sample, and the padded-batch slot."""

    def __init__(self, cu, tokens: int, device):
        cu_host = [int(x) for x in cu.tolist()]  # one host read per step (the layout is cached per tensor)
        if cu_host[0] != 0 or cu_host[-1] != tokens or any(b <= a for a, b in pairwise(cu_host)):
            raise ValueError(f"cu_seq_lens_q {cu_host[:4]}... does not split the {tokens} packed tokens")
        lengths = [b - a for a, b in pairwise(cu_host)]
        self.n, self.width = len(lengths), max(lengths)
        pos = torch.cat([torch.arange(n) for n in lengths])
        sample = torch.repeat_interleave(torch.arange(self.n), torch.tensor(lengths))
        self.position = pos.to(device)  # position inside the sample, per token
        self.slot = (sample * self.width + pos).to(device)  # index into the (n x width) padded batch
        self.cu = cu.to(device=device, dtype=torch.int32)
        _COUNTS["layouts"] += 1


def _layout_for(cu, tokens: int, device) -> _Layout:
    hit = _LAYOUTS.get(id(cu))
    if hit is not None and hit[0] is cu:
        return hit[1]
    layout = _Layout(cu, tokens, device)
    if len(_LAYOUTS) >= _MAX_LAYOUTS:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[id(cu)] = (cu, layout)
    return layout


def varlen_causal_conv(x, weight, bias, position, activation: str | None):
    """Depthwise causal convolution of ``x`` ``(1, channels, tokens)`` with ``weight`` ``(channels, kernel)``,
    no tap reaching before the token's own sample start (``position``: the token's index inside its sample)."""
    from transformers.activations import ACT2FN

    kernel = weight.shape[-1]
    x = x.to(weight.dtype)
    out = x * weight[:, kernel - 1, None]
    for shift in range(1, kernel):
        tap = F.pad(x, (shift, 0))[..., : x.shape[-1]] * (position >= shift).to(x.dtype)
        out = out + tap * weight[:, kernel - 1 - shift, None]
    if bias is not None:
        out = out + bias[:, None]
    return ACT2FN[activation](out) if activation is not None else out


def _fla_route(query) -> bool:
    return query.is_cuda and importlib.util.find_spec("fla") is not None


def varlen_delta_rule(chunk_rule, query, key, value, g, beta, layout: _Layout):
    """The gated delta rule over ``(1, tokens, heads, dim)`` inputs, every sample from a zero state."""
    if _fla_route(query):
        out, _ = chunk_rule(query, key, value, g=g, beta=beta, cu_seqlens=layout.cu, use_qk_l2norm_in_kernel=True)
        return out

    def batch(t):  # (1, tokens, ...) -> (n, width, ...), zero-padded at the end of each sample
        flat = t[0]
        out = flat.new_zeros((layout.n * layout.width, *flat.shape[1:]))
        out = out.index_copy(0, layout.slot, flat)
        return out.reshape(layout.n, layout.width, *flat.shape[1:])

    reference = inspect.unwrap(chunk_rule)  # transformers' PyTorch rule (not a CUDA-only kernel it may wrap)
    out, _ = reference(batch(query), batch(key), batch(value), g=batch(g), beta=batch(beta),
                       use_qk_l2norm_in_kernel=True)
    return out.reshape(layout.n * layout.width, *out.shape[2:]).index_select(0, layout.slot)[None]


def _packed_forward(self, hidden_states, cu):
    """The layer's forward on a packed batch (no cache): the stock computation with both states reset per sample."""
    rows, width, _ = hidden_states.shape
    tokens = rows * width
    layout = _layout_for(cu, tokens, hidden_states.device)
    x = hidden_states.reshape(1, tokens, -1)
    mixed = self.in_proj_qkv(x).transpose(1, 2)
    z = self.in_proj_z(x).reshape(1, tokens, -1, self.head_v_dim)
    b, a = self.in_proj_b(x), self.in_proj_a(x)
    mixed = varlen_causal_conv(mixed, self.conv1d.weight.squeeze(1), self.conv1d.bias, layout.position,
                               self.activation).to(hidden_states.dtype).transpose(1, 2)
    query, key, value = torch.split(mixed, [self.key_dim, self.key_dim, self.value_dim], dim=-1)
    query = query.reshape(1, tokens, -1, self.head_k_dim)
    key = key.reshape(1, tokens, -1, self.head_k_dim)
    value = value.reshape(1, tokens, -1, self.head_v_dim)
    beta = b.sigmoid()
    g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # as the stock layer (fp16-safe)
    chunk_rule = sys.modules[type(self).__module__].torch_chunk_gated_delta_rule
    core = varlen_delta_rule(chunk_rule, query, key, value, g, beta, layout)
    core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
    if not _COUNTS["packed_calls"]:
        logger.info("linear attention: a packed batch, %d segments in %d row(s), each from a zero state", layout.n,
                    rows)
    _COUNTS["packed_calls"] += 1
    return self.out_proj(core.reshape(rows, width, -1))


def _forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or cache is not None:
        return super(type(self), self).forward(hidden_states, cache=cache, attention_mask=attention_mask, **kwargs)
    return _packed_forward(self, hidden_states, cu)


def _varlen_class(cls: type) -> type:
    from qwenvl.attention import subclass_once

    return subclass_once(_CLASSES, cls, {"forward": _forward, "_vlsft_varlen": True})


def is_linear_attention_layer(module) -> bool:
    """A Gated DeltaNet layer of the Qwen3.5 families (the parts this module reads are all present)."""
    return type(module).__name__.endswith("GatedDeltaNet") and all(
        hasattr(module, n) for n in ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "conv1d", "A_log",
                                     "dt_bias", "norm", "out_proj"))


def install(model) -> int:
    """Give every Gated DeltaNet layer of ``model`` the per-sample path for packed rows; returns how many."""
    n = 0
    for module in model.modules():
        if getattr(type(module), "_vlsft_varlen", False):
            n += 1
        elif is_linear_attention_layer(module):
            module.__class__ = _varlen_class(type(module))
            n += 1
    if n:
        logger.info("linear attention: %d Gated DeltaNet layers keep packed samples apart (%s)", n,
                    "flash-linear-attention varlen on CUDA" if importlib.util.find_spec("fla") else
                    "PyTorch chunked rule over the samples as one padded batch")
    return n

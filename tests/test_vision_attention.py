"""qwenvl.attention: the vision tower's attention in <= 2 calls per layer, exact against transformers' stock path
(fp32, CPU) for Qwen2-VL, Qwen2.5-VL (windowed + full layers), Qwen3-VL and Qwen3.5 on images of many sizes and
aspect ratios, several images and videos in one batch; frozen blocks run forward-only with the trained parameters'
gradients unchanged."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from qwenvl import attention  # noqa: E402
from qwenvl.model import apply_freezing  # noqa: E402
from qwenvl.tiny import tiny_config  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]
# (t, h, w) in patches, h and w multiples of the merge size: tall, wide, tiny, large, a 2-frame video, odd windows
GRIDS = [(1, 16, 20), (1, 4, 2), (1, 34, 10), (2, 8, 12), (1, 2, 2), (1, 10, 30), (3, 6, 6)]


def _model(family: str, depth: int = 4):
    from transformers import AutoModelForImageTextToText

    cfg = tiny_config(family)
    cfg.vision_config.depth = depth
    if family == "qwen2_5_vl":
        cfg.vision_config.fullatt_block_indexes = [1, 3]
    if hasattr(cfg.vision_config, "deepstack_visual_indexes"):
        cfg.vision_config.deepstack_visual_indexes = [0, 2]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model


def _inputs(model, grids):
    vc = model.config.vision_config
    width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    n = sum(t * h * w for t, h, w in grids)
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, width, generator=g), torch.tensor(grids, dtype=torch.long)


def _run(model, pixels, grid):
    visual = model.model.visual
    out = visual(pixels, grid_thw=grid)
    tensors = [out.pooler_output]
    extra = getattr(out, "deepstack_features", None)
    if extra:
        tensors += list(extra)
    loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in tensors)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in visual.named_parameters() if p.grad is not None}
    return [t.detach() for t in tensors], grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train_vision", [False, True], ids=["frozen-tower", "trained-tower"])
def test_exact_against_stock_path(family, train_vision):
    stock = _model(family)
    fast = copy.deepcopy(stock)
    for m in (stock, fast):
        apply_freezing(m, tune_mm_vision=train_vision, tune_mm_mlp=True, tune_mm_llm=False)
        m.train()
    assert attention.install(fast)
    n_frozen = attention.forward_only_frozen_blocks(fast)
    assert n_frozen == (0 if train_vision else len(fast.model.visual.blocks))
    pixels, grid = _inputs(stock, GRIDS)
    want, want_g = _run(stock, pixels, grid)
    attention.reset_stats()
    got, got_g = _run(fast, pixels, grid)
    for a, b in zip(want, got, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()
    assert set(want_g) == set(got_g) and want_g
    for name, g in want_g.items():
        assert torch.allclose(g, got_g[name], atol=1e-5, rtol=1e-4), (name, (g - got_g[name]).abs().max())
    if not train_vision:  # only the merger(s) train
        assert all(n.startswith(("merger", "deepstack_merger")) for n in got_g)
    depth = len(fast.model.visual.blocks)
    assert attention.stats()["calls"] == depth  # one call per layer (no checkpointing here: no recompute)


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_per_layer_do_not_grow_with_windows_and_images(family):
    """One forward: exactly one vision-attention call per layer whether 1 or 40 images; plans built once per
    cu_seqlens kind (Qwen2.5-VL: windows and full; the others: full only) and the sdpa calls <= 2 per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sdpa = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
                self.sdpa += 1
            return func(*args, **(kwargs or {}))

    model = _model(family)
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    attention.install(model)
    attention.forward_only_frozen_blocks(model)
    depth = len(model.model.visual.blocks)
    for grids in ([(1, 16, 16)], [(1, 16, 20), (1, 2, 2)] * 20, [(2, 8, 12), (1, 4, 2)] * 10):
        attention.reset_stats()
        pixels, grid = _inputs(model, grids)
        with Count() as c:
            model.model.visual(pixels, grid_thw=grid)
        assert attention.stats()["calls"] == depth
        # windows + full attention (Qwen2.5-VL), full only (the others): once each per forward, not per layer
        assert attention.stats()["plans"] == (2 if family == "qwen2_5_vl" else 1)
        assert c.sdpa <= 2 * depth


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_blocks_have_no_backward_and_no_recompute(family):
    """With checkpointing on (as the trainer runs) and enable_input_require_grads, a frozen tower dispatches no
    attention backward and no second forward; the merger(s) still get their gradients."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fwd = self.bwd = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__
            if "scaled_dot_product" in name or "attention" in name:
                if "backward" in name:
                    self.bwd += 1
                else:
                    self.fwd += 1
            return func(*args, **(kwargs or {}))

    model = _model(family)
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    attention.install(model)
    attention.forward_only_frozen_blocks(model)
    pixels, grid = _inputs(model, GRIDS)
    with Count() as c:
        out = model.model.visual(pixels, grid_thw=grid)
        extra = getattr(out, "deepstack_features", None) or []
        sum(t.sum() for t in [out.pooler_output, *extra]).backward()
    depth = len(model.model.visual.blocks)
    assert c.bwd == 0
    assert c.fwd <= 2 * depth  # no recompute
    trained = [n for n, p in model.model.visual.named_parameters() if p.grad is not None]
    assert trained and all(n.startswith(("merger", "deepstack_merger")) for n in trained)


def test_split_point_and_plan_order():
    assert attention.split_point([64] * 10) == 10  # equal lengths: one group
    k = attention.split_point([4] * 30 + [400])
    assert k == 30  # the long one alone
    # a plan over spans of mixed lengths gives back the tokens in order
    cu = torch.tensor([0, 3, 4, 40, 42, 100], dtype=torch.int32)
    q = torch.randn(100, 2, 8)
    out = attention.padded_sdpa(q, q, q, cu, 8 ** -0.5)
    ref = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[a:b].transpose(0, 1), q[a:b].transpose(0, 1), q[a:b].transpose(0, 1)).transpose(0, 1)
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])
    assert torch.allclose(out, ref, atol=1e-6)


def test_saved_config_keeps_the_loaded_implementation(tmp_path):
    model = _model("qwen2_5_vl", depth=2)
    attention.install(model)
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert attention.VISION_ATTENTION not in text


def test_flash_attention_models_are_left_alone():
    model = _model("qwen2_vl", depth=2)
    model.model.visual.config._attn_implementation = "flash_attention_2"
    assert attention.install(model) is False
    assert model.model.visual.config._attn_implementation == "flash_attention_2"


def test_route_on_cpu_is_padded_sdpa():
    assert attention.route(torch.zeros(4, 2, 8)) == "padded_sdpa"
    assert attention.route(torch.zeros(4, 2, 8, dtype=torch.bfloat16)) == "padded_sdpa"


# ---- the language model: packed rows as one causal variable-length kernel on CUDA ----------------------------------

def _text_batches():
    """padded (2 rows, right padding), flattened (one row, 3 samples) and packed (2 rows of several samples, the
    padding tail a masked segment) text batches as the collator lays them out."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 150000, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    padded = {"input_ids": ids, "attention_mask": mask}

    def rows(lengths_per_row, width):
        pos, cu, start = [], [0], 0
        for lengths in lengths_per_row:
            r = []
            for n in lengths + ([width - sum(lengths)] if sum(lengths) < width else []):
                r += list(range(n))
                start += n
                cu.append(start)
            pos.append(r)
        p = torch.tensor(pos).unsqueeze(0).expand(4, -1, -1).clone()
        n_rows = len(lengths_per_row)
        return {"input_ids": torch.randint(0, 150000, (n_rows, width), generator=g), "position_ids": p,
                "cu_seq_lens_q": torch.tensor(cu, dtype=torch.int32), "cu_seq_lens_k": torch.tensor(cu, dtype=torch.int32),
                "max_length_q": max(max(x) for x in pos) + 1, "max_length_k": max(max(x) for x in pos) + 1}

    return {"padded": padded, "flatten": rows([[7, 11, 6]], 24), "packing": rows([[9, 8], [12, 5, 4]], 21)}


def _reference_varlen(signature: str):
    """A stand-in for torch's CUDA-only varlen_attn (per-sequence sdpa), in one of its two signatures, so the
    plumbing (flattening, cu_seqlens, causality, grouped heads, scale) is exercised on CPU."""
    import torch.nn.functional as F

    def run(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, gqa):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and int(cu_q[-1]) == q.shape[0]
        if k.shape[1] != q.shape[1]:
            assert gqa, "grouped heads need enable_gqa or repeated heads"
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        outs = []
        for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=causal,
                                               scale=scale)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    if signature == "window":  # torch 2.14
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                        enable_gqa=False):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, window_size == (-1, 0), scale, enable_gqa)
    else:  # an earlier release: is_causal, no enable_gqa
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None):
            return run(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal, scale, False)
    return varlen_attn


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("kernel", ["cpu", "window", "is_causal"])
def test_text_attention_exact_for_padded_flatten_packing(family, kernel, monkeypatch):
    stock = _model(family, depth=2)
    fast = copy.deepcopy(stock)
    assert attention.install_text(fast)
    if kernel != "cpu":
        monkeypatch.setattr(attention, "_torch_varlen", lambda: _reference_varlen(kernel))
        monkeypatch.setattr(attention, "route", lambda q: "varlen")
    for mode, batch in _text_batches().items():
        attention.reset_stats()
        a = stock(**batch, use_cache=False).logits
        b = fast(**batch, use_cache=False).logits
        assert torch.allclose(a, b, atol=1e-5), (mode, (a - b).abs().max())
        layers = stock.config.text_config.num_hidden_layers
        want = layers if kernel != "cpu" and mode != "padded" else 0
        assert attention.stats().get("text_varlen", 0) == want, mode

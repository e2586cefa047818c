"""Packed / flattened Qwen3.5 rows (Gated DeltaNet linear attention) equal the samples run one by one.

Tiny random Qwen3.5 dense and MoE (fp32, one linear-attention layer + one full-attention layer, weights x3 so
leaks show), the real Qwen3 tokenizer, text samples longer than one 64-token chunk of the delta rule, an image
sample; summed token losses (from the logits: the MoE router's auxiliary loss depends on the batch by design) and
every parameter gradient compared with each sample alone in a padded batch of one. Negative control: the same
packed batch through transformers' own layer with the boundaries hidden leaks.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from equivalence import max_rel_grad as _max_rel

from qwenvl import linear_attention
from qwenvl.data.collate import pop_batch_stats
from qwenvl.data.dataset import make_builder, make_collator

MODEL_KEYS = ("input_ids", "position_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
              "video_grid_thw", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def _text(n: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from qwenvl.tiny import build_tokenizer_dir

    return build_tokenizer_dir(tmp_path_factory.mktemp("qwen35-tok"), family="qwen3_5")


def _model(family: str):
    from transformers import AutoModelForImageTextToText

    from qwenvl.tiny import tiny_config

    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_config(tiny_config(family), dtype=torch.float32,
                                                attn_implementation="sdpa")
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    return m.train()


@pytest.fixture(scope="module")
def samples(tokenizer_dir, golden_dir):
    from transformers import AutoImageProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = types.SimpleNamespace(max_pixels=50176, min_pixels=3136, model_max_length=1024, data_flatten=False,
                                 data_packing=False)
    for name in ("video_max_frame_pixels", "video_min_frame_pixels", "base_interval", "video_min_frames",
                 "video_max_frames", "video_fps", "video_max_pixels", "video_min_pixels"):
        setattr(args, name, None)
    args.base_interval, args.video_min_frames, args.video_max_frames = 2, 4, 8
    args.video_max_frame_pixels, args.video_min_frame_pixels = 25088, 3136
    builder = make_builder(tok, AutoImageProcessor.from_pretrained(tokenizer_dir), args, "qwen3_5")
    recs = [
        {"conversations": [{"from": "human", "value": _text(60, 1)}, {"from": "gpt", "value": _text(50, 2)}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": _text(5, 3)}]},
        {"image": None,
         "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": _text(9, 4)}]},
        {"conversations": [{"from": "human", "value": _text(30, 5)}, {"from": "gpt", "value": _text(140, 6)}]},
    ]
    images = sorted(p for p in (golden_dir / "media" / "images").iterdir() if p.suffix in (".png", ".jpg"))
    recs[2]["image"] = str(images[0].relative_to(golden_dir / "media"))
    out = [builder.build(r, str(golden_dir / "media")) for r in recs]
    assert max(len(s["input_ids"]) for s in out) > 128 and "pixel_values" in out[2]  # crosses 64-token chunks
    return builder, tok, out, args


def _token_loss_sum(logits, labels) -> torch.Tensor:
    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(), ignore_index=-100,
                           reduction="sum")


def _grads(model) -> dict:
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _run(model, batch) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    out = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False)
    loss = _token_loss_sum(out.logits, batch["labels"])
    loss.backward()
    return float(loss.detach()), _grads(model)


def _one_by_one(model, builder, tok, items, args) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    collate = make_collator(tok, builder, args, ensure_vision=False)
    for s in items:
        batch = collate([s])
        out = model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False)
        loss = _token_loss_sum(out.logits, batch["labels"])
        loss.backward()
        total += float(loss.detach())
    return total, _grads(model)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
@pytest.mark.parametrize("mode", ["packing", "flatten"])
def test_packed_rows_equal_one_by_one(samples, family, mode):
    builder, tok, items, args = samples
    model = _model(family)
    assert linear_attention.install(model) == 1  # the tiny config's one Gated DeltaNet layer
    ref_loss, ref_grads = _one_by_one(model, builder, tok, items, args)
    packed_args = types.SimpleNamespace(**{**vars(args), "data_packing": mode == "packing",
                                           "data_flatten": mode == "flatten", "model_max_length": 256})
    batch = make_collator(tok, builder, packed_args, ensure_vision=False)(list(items))
    assert pop_batch_stats(batch)["num_samples"] == 4
    rows = batch["input_ids"].shape[0]
    assert (rows >= 2 if mode == "packing" else rows == 1) and len(batch["cu_seq_lens_q"]) >= 4
    linear_attention.reset_stats()
    loss, grads = _run(model, batch)
    assert linear_attention.stats() == {"packed_calls": 1, "layouts": 1}  # one layer, one call, one host read
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert _max_rel(ref_grads, grads) < 1e-5, _max_rel(ref_grads, grads)
    layer = next(m for m in model.modules() if linear_attention.is_linear_attention_layer(m))
    assert grads[next(n for n, p in model.named_parameters() if p is layer.conv1d.weight)].abs().sum() > 0


@pytest.mark.slow
def test_the_stock_layer_leaks_across_samples(samples):
    """Negative control: transformers' own layer on the packed row, boundaries hidden (its PyTorch path refuses
    them), lets later samples read earlier ones - the gradients differ from one by one."""
    builder, tok, items, args = samples
    model = _model("qwen3_5")
    ref_loss, ref_grads = _one_by_one(model, builder, tok, items, args)
    flat_args = types.SimpleNamespace(**{**vars(args), "data_flatten": True})
    batch = make_collator(tok, builder, flat_args, ensure_vision=False)(list(items))
    pop_batch_stats(batch)
    for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        batch.pop(k)  # the full-attention layer still sees the boundaries through the position ids
    _, grads = _run(model, batch)
    assert _max_rel(ref_grads, grads) > 1e-3


def test_varlen_convolution_restarts_at_every_sample():
    torch.manual_seed(1)
    x = torch.randn(1, 6, 11)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    lengths = [3, 1, 7]
    position = torch.cat([torch.arange(n) for n in lengths])
    got = linear_attention.varlen_causal_conv(x, weight, bias, position, "silu")
    start = 0
    for n in lengths:  # each sample alone through the stock depthwise causal convolution
        part = F.conv1d(x[..., start:start + n], weight[:, None], bias, padding=3, groups=6)[..., :n]
        torch.testing.assert_close(got[..., start:start + n], F.silu(part), rtol=1e-6, atol=1e-6)
        start += n


def test_layouts_are_checked_and_cached():
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    linear_attention.reset_stats()
    a = linear_attention._layout_for(cu, 11, torch.device("cpu"))
    assert linear_attention._layout_for(cu, 11, torch.device("cpu")) is a and linear_attention.stats()["layouts"] == 1
    assert a.position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 5, 6] and (a.n, a.width) == (3, 7)
    with pytest.raises(ValueError, match="does not split the 12 packed tokens"):
        linear_attention._Layout(cu, 12, torch.device("cpu"))

"""Flattened / packed / padded batches give the same loss and gradients as samples run one by one.

Tiny random Qwen2.5-VL (fp32, sdpa and eager), real tokenizer, real images and a real video from
the golden set. Summed token losses and every parameter gradient are compared (gradients show
cross-sample attention leaks that the loss barely does). Also: the ZeRO-3 dummy vision segments
change nothing, and a negative control (3-row positions) does leak.
"""

from __future__ import annotations

import json

import pytest
import torch
from equivalence import max_rel_grad as _max_rel_grad

from qwenvl.data.collate import DataCollator, pop_batch_stats
from qwenvl.data.sample import SampleBuilder, VisionBudget

pytestmark = pytest.mark.slow

MODEL_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "pixel_values", "image_grid_thw",
              "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "cu_seq_lens_q", "cu_seq_lens_k",
              "max_length_q", "max_length_k", "use_cache")


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # make logits far from uniform so leaks show
        for p in m.parameters():
            p.mul_(3.0)
    m.train()
    return m


@pytest.fixture(scope="module")
def samples(tiny_model_dir, golden_dir) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    recs = {r["id"]: r for r in json.loads((golden_dir / "annotations/public_a.json").read_text())}
    for line in (golden_dir / "annotations/public_b.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["id"]] = r
    b = SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784))
    return {sid: b.build(recs[sid], str(golden_dir / "media")) for sid in ("si_01", "txt_01", "vid_01", "mi_02",
                                                                           "txt_03", "q_01")}


def _n_trained(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


def _grads(model) -> dict:
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _run(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k in MODEL_KEYS}
    inputs.setdefault("use_cache", False)
    out = model(**inputs)
    total = out.loss * _n_trained(batch["labels"])
    total.backward()
    return float(total.detach()), _grads(model)


def _reference(model, items: list[dict]) -> tuple[float, dict]:
    """Each sample alone (batch of one, no padding); summed token losses and summed gradients."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for s in items:
        inputs = {"input_ids": s["input_ids"][None], "labels": s["labels"][None],
                  "position_ids": s["position_ids"][:, None], "use_cache": False}
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
            if k in s:
                inputs[k] = s[k]
        loss = model(**inputs).loss * _n_trained(s["labels"])
        loss.backward()
        total += float(loss.detach())
    return total, _grads(model)


ORDER = ["si_01", "txt_01", "vid_01", "mi_02", "q_01"]


@pytest.mark.parametrize("mode", ["flatten", "packing", "padded"])
def test_batch_equals_one_by_one(model, samples, mode):
    items = [samples[s] for s in ORDER]
    ref_loss, ref_grads = _reference(model, items)
    coll = DataCollator(pad_token_id=151643, mode=mode, model_max_length=320, ensure_vision=True)
    batch = coll(items)
    assert pop_batch_stats(batch) == {"num_samples": 5, "num_skipped": 0}
    if mode == "packing":
        assert batch["input_ids"].shape[0] >= 2 and batch["input_ids"].shape[1] <= 320  # really packed in rows
    loss, grads = _run(model, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert _max_rel_grad(ref_grads, grads) < 1e-4
    # vision weights got gradient (images really went through the tower)
    assert grads["model.visual.patch_embed.proj.weight"].abs().sum() > 0


def test_eager_attention_flatten(model, samples):
    items = [samples[s] for s in ("si_01", "txt_03", "vid_01")]
    model.set_attn_implementation("eager")
    try:
        ref_loss, ref_grads = _reference(model, items)
        loss, grads = _run(model, DataCollator(pad_token_id=151643, mode="flatten")(items))
    finally:
        model.set_attn_implementation("sdpa")
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert _max_rel_grad(ref_grads, grads) < 1e-4


@pytest.mark.parametrize("mode", ["flatten", "padded", "packing"])
def test_dummy_vision_changes_nothing(model, samples, mode):
    items = [samples["txt_01"], samples["txt_03"]]  # text only: both dummies get added
    with_d = DataCollator(pad_token_id=151643, mode=mode, model_max_length=512, ensure_vision=True)(items)
    without = DataCollator(pad_token_id=151643, mode=mode, model_max_length=512, ensure_vision=False)(items)
    assert with_d["image_grid_thw"].tolist() == [[1, 2, 2]] and with_d["video_grid_thw"].tolist() == [[1, 2, 2]]
    assert "pixel_values" not in without
    l1, g1 = _run(model, with_d)
    l0, g0 = _run(model, without)
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert _max_rel_grad(g0, g1) < 1e-5
    # the vision tower ran (ZeRO-3 needs the call) but got exactly zero gradient from the dummy
    assert g1["model.visual.patch_embed.proj.weight"] is not None
    assert not g1["model.visual.patch_embed.proj.weight"].any()


def test_all_bad_batch_is_finite_dummy(model):
    coll = DataCollator(pad_token_id=151643, mode="flatten")
    batch = coll([{"bad_sample": "x"}, {"bad_sample": "y"}])
    assert pop_batch_stats(batch) == {"num_samples": 0, "num_skipped": 2, "skipped": [
        {"kind": "other", "reason": "x"}, {"kind": "other", "reason": "y"}]}
    loss, _ = _run(model, batch)
    assert loss == loss and abs(loss) < 1e6  # finite; the trainer multiplies it by 0


def test_negative_control_three_rows_leak(model, samples):
    items = [samples[s] for s in ("si_01", "txt_03", "vid_01")]
    ref_loss, ref_grads = _reference(model, items)
    batch = DataCollator(pad_token_id=151643, mode="flatten", ensure_vision=False)(items)
    batch["position_ids"] = batch["position_ids"][1:]  # 3 rows: transformers cannot see sample boundaries
    _, grads = _run(model, batch)
    assert _max_rel_grad(ref_grads, grads) > 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["flatten", "packing"])
def test_cuda_packed_equivalence(tiny_model_dir, tmp_path, mode):
    """On a GPU (sdpa, fp32): packed rows equal one by one, synthetic images + the dummy video."""
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    rng = torch.Generator().manual_seed(0)
    for k, (w, h) in enumerate([(224, 224), (320, 200), (90, 700)]):
        arr = (torch.rand(h, w, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"im{k}.png")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = SampleBuilder(tok, VisionBudget(max_pixels=50176, min_pixels=784))
    conv = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    items = [b.build({"image": "im0.png", "conversations": conv("<image>\nDescribe.", "Noise, mostly grey.")},
                     str(tmp_path)),
             b.build({"conversations": conv("Say hi.", "Hi there, friend!")}, None),
             b.build({"image": ["im1.png", "im2.png"], "conversations": conv("<image> and <image>?", "Two noisy pics.")},
                     str(tmp_path))]
    m = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                    attn_implementation="sdpa").cuda()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    m.train()
    cuda = lambda d: {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in d.items()}  # noqa: E731
    ref_loss, ref_grads = _reference(m, [cuda(s) for s in items])
    batch = DataCollator(pad_token_id=151643, mode=mode, model_max_length=200)(items)
    pop_batch_stats(batch)
    loss, grads = _run(m, cuda(batch))
    assert loss == pytest.approx(ref_loss, rel=1e-4)
    assert _max_rel_grad(ref_grads, grads) < 1e-3

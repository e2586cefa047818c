"""A whole training step (the project's builder + packing collator, frozen vision, activation checkpointing with
enable_input_require_grads, as the trainer runs it) counted with benchmarks/step_cost.py's CostCounter: with the
trainer's speed path the vision tower makes one attention call per layer and none backward, whatever the number of
images and windows; the loss and every trained gradient equal the stock path's."""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def step_cost(repo_root):
    sys.path.insert(0, str(repo_root / "benchmarks"))
    import step_cost

    return step_cost


def _model(fast: bool):
    from transformers import AutoModelForImageTextToText

    from qwenvl.attention import prepare_for_training
    from qwenvl.model import apply_freezing
    from qwenvl.tiny import tiny_config

    cfg = tiny_config("qwen2_5_vl")
    cfg.vision_config.depth = 4
    cfg.vision_config.fullatt_block_indexes = [1, 3]
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if fast:
        prepare_for_training(model)
    model.train()
    return model


def _batch(tokenizer_dir, n: int):
    import random

    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor

    from qwenvl.data.collate import DataCollator, pop_batch_stats
    from qwenvl.data.sample import SampleBuilder, VisionBudget

    tok = AutoProcessor.from_pretrained(tokenizer_dir).tokenizer
    builder = SampleBuilder(tok, budget=VisionBudget(max_pixels=64 * 28 * 28, min_pixels=4 * 28 * 28),
                            model_type="qwen2_5_vl")
    rng = random.Random(n)
    samples = []
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            w, h = rng.randint(2, 12) * 28, rng.randint(2, 12) * 28
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"{tmp}/{i}.png")
            rec = {"image": f"{i}.png", "conversations": [{"from": "human", "value": "<image>\nwhat is it?"},
                                                           {"from": "gpt", "value": "a chart " * rng.randint(1, 9)}]}
            samples.append(builder.build(rec, tmp))
    b = DataCollator(pad_token_id=151643, mode="packing", model_max_length=32768)(samples)
    pop_batch_stats(b)
    b["use_cache"] = False
    return b


def _step(model, batch, counter):
    with counter:
        out = model(**batch)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads, counter.result()


@pytest.mark.slow
@pytest.mark.parametrize("n_images", [1, 12])
def test_step_cost_bounds_and_exactness(step_cost, qwen_tokenizer_dir, n_images):
    batch = _batch(qwen_tokenizer_dir, n_images)
    loss_s, grads_s, stock = _step(_model(False), batch, step_cost.CostCounter())
    loss_f, grads_f, fast = _step(_model(True), batch, step_cost.CostCounter())
    assert abs(loss_s - loss_f) <= 1e-5 * max(1.0, abs(loss_s))
    assert set(grads_s) == set(grads_f)
    for name, g in grads_s.items():
        assert torch.allclose(g, grads_f[name], atol=1e-5, rtol=1e-4), name
    depth = 4
    # CostCounter tells the sides apart by head_dim: the tiny vision head_dim is 16, the text one 16 too, so count
    # vision calls by the attention module's own counter instead
    from qwenvl import attention

    attention.reset_stats()
    _step(_model(True), batch, step_cost.CostCounter())
    towers = 1 + ("pixel_values_videos" in batch)  # the collator's masked dummy video runs the tower once more
    assert attention.stats()["calls"] == depth * towers <= 2 * depth  # per layer: no per-window calls, no recompute
    total_fwd = fast["attention_calls"]["vision_forward"] + fast["attention_calls"]["llm_forward"]
    total_bwd = fast["attention_calls"]["vision_backward"] + fast["attention_calls"]["llm_backward"]
    llm_layers = 2
    assert total_fwd <= 2 * depth * towers + 2 * llm_layers  # <= 2 sdpa per vision layer (length groups); LM fwd + recompute
    assert total_bwd == llm_layers  # the frozen tower has no attention backward
    stock_fwd = stock["attention_calls"]["vision_forward"] + stock["attention_calls"]["llm_forward"]
    assert stock_fwd > total_fwd and stock["aten_ops"] > fast["aten_ops"]
    assert fast["host_syncs"] < stock["host_syncs"]


def test_bf16_step_runs_no_matmul_in_fp32(qwen_tokenizer_dir):
    """A bf16 training step (the trainer's speed path, chunked loss head) runs every matmul and attention in bf16:
    the fp32 work left is element-wise (norms, softmax statistics, the loss)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from qwenvl import loss as qloss

    MATMULS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "convolution", "_convolution")

    class Fp32Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen, self.fp32 = 0, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            base = func.__name__.split(".")[0]
            if base in MATMULS or "scaled_dot_product" in base:
                self.seen += 1
                operands = args[:4] if "scaled_dot_product" in base else args  # not the fp32 logsumexp
                dtypes = {a.dtype for a in operands if torch.is_tensor(a) and a.is_floating_point()}
                if torch.float32 in dtypes:
                    self.fp32.append(base)
            return func(*args, **(kwargs or {}))

    model = _model(True).to(torch.bfloat16)
    assert qloss.install(model)
    batch = _batch(qwen_tokenizer_dir, 3)
    batch = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
             for k, v in batch.items()}
    labels = batch.pop("labels")
    with Fp32Matmuls() as m, qloss.armed(labels):
        loss = qloss.token_mean_loss(model(**batch), labels)
        loss.backward()
    assert m.seen > 50 and m.fp32 == [], sorted(set(m.fp32))

"""Measured, not assumed (issue 18 item 6): a bf16 training step really multiplies in bf16, and the trainer's AdamW
is the fused one where torch has the kernel.

Every matmul-like aten op of one whole training step (forward, backward through activation checkpointing, the
chunked loss head, fused AdamW) is recorded with a ``TorchDispatchMode`` on a tiny model loaded in bf16, as the
trainer loads it with ``bf16: true``; every floating operand must be bf16. Deliberately fp32, and not an operand
of any product: the log-sum-exp statistics that the flash-attention forward returns and its backward takes back
(:data:`FP32_BY_DESIGN`; every flash kernel keeps them in fp32). Elementwise fp32 work (RMSNorm and the vision
rotary embedding upcast inside, the loss's softmax over bf16 logits in :mod:`qwenvl.loss`) is no matmul and is
not checked here.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

#: matmul-like aten ops (their ``.default`` / ``.out`` overloads) whose floating inputs must all be bf16
MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "dot", "mv", "addmv", "einsum",
              "convolution", "convolution_backward", "_convolution",
              "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
              "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
              "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
              "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
              "_efficient_attention_backward"}
#: (op, argument name) kept in fp32 on purpose: the softmax log-sum-exp a flash forward saves for its backward
FP32_BY_DESIGN = {("_scaled_dot_product_flash_attention_for_cpu_backward", "logsumexp"),
                  ("_scaled_dot_product_flash_attention_backward", "logsumexp"),
                  ("_scaled_dot_product_efficient_attention_backward", "logsumexp"),
                  ("_scaled_dot_product_cudnn_attention_backward", "logsumexp"),
                  ("_flash_attention_backward", "logsumexp"), ("_efficient_attention_backward", "logsumexp")}


class MatmulDtypes:
    """Records, per matmul-like op, the dtypes of its floating tensor arguments (by schema name)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        rec = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                rec._see(func, args, kwargs or {})
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()
        self.calls: Counter = Counter()
        self.fp32: Counter = Counter()  # (op, argument) -> calls with an fp32 operand not allowed by design
        self.allowed: Counter = Counter()

    def _see(self, func, args, kwargs) -> None:
        base = func.__name__.split(".")[0]
        if base not in MATMUL_OPS:
            return
        self.calls[base] += 1
        names = [a.name for a in func._schema.arguments]
        for name, value in [*zip(names, args, strict=False), *kwargs.items()]:
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.bfloat16:
                (self.allowed if (base, name) in FP32_BY_DESIGN else self.fp32)[(base, name, str(value.dtype))] += 1

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def tiny_bf16_model(family: str, *, lora: bool = False):
    """The tiny random model of ``family`` in bf16 with the trainer's recipe: vision frozen, merger and language
    model trained (or LoRA on it), activation checkpointing, vlsft's speed path and chunked loss head."""
    from qwenvl import families
    from qwenvl import loss as qloss
    from qwenvl.attention import prepare_for_training
    from qwenvl.model import apply_freezing
    from qwenvl.tiny import tiny_config

    torch.manual_seed(0)
    import transformers

    cls = getattr(transformers, families.family(family).model_class)
    model = cls._from_config(tiny_config(family), dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=not lora)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if lora:
        from qwenvl.lora import apply_lora, resolve_targets

        plan = resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False, targets="llm")
        model = apply_lora(model, plan, r=8, alpha=16, dropout=0.0)
    prepare_for_training(model)
    qloss.install(model)
    model.train()
    return model


def synthetic_batch(model, n_text: int = 24) -> dict:
    """One sample: text, an image of 4x4 patches (4 merged tokens), text; labels on the last tokens. The model
    computes its own positions (works for every family)."""
    cfg = model.config
    vc = cfg.vision_config
    merge = vc.spatial_merge_size
    grid = torch.tensor([[1, 2 * merge, 2 * merge]])
    n_img = int(grid.prod()) // merge**2
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    g = torch.Generator().manual_seed(0)
    text = torch.randint(100, 5000, (n_text,), generator=g)
    ids = torch.cat([text[:4], torch.tensor([cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                                            + [cfg.vision_end_token_id]), text[4:]])[None]
    labels = ids.clone()
    labels[:, :n_img + 8] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == cfg.image_token_id).long(),  # 1 = image: the model's own M-RoPE
            "pixel_values": torch.randn(int(grid.prod()), patch_dim, generator=g), "image_grid_thw": grid}


def one_step(model, batch: dict, opt) -> float:
    from qwenvl import loss as qloss

    batch = {**batch, "use_cache": False}
    labels = batch.pop("labels")
    with qloss.armed(labels):
        loss = qloss.token_mean_loss(model(**batch), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _optimizer(model):
    from qwenvl.model import parameter_groups
    from qwenvl.optim import adamw_kwargs

    groups = parameter_groups(model, learning_rate=1e-4, weight_decay=0.0)
    return torch.optim.AdamW(groups, lr=1e-4, **adamw_kwargs("adamw_torch_fused", [p for g in groups
                                                                                  for p in g["params"]]))


def _assert_bf16(rec: MatmulDtypes, loss: float) -> None:
    assert 0 < loss < 20
    assert rec.fp32 == Counter(), f"matmul operands not in bf16: {dict(rec.fp32)}"
    # the check saw the step: products forward and backward, attention forward and backward
    assert rec.calls["mm"] + rec.calls["addmm"] > 20
    assert any("attention" in k and "backward" not in k for k in rec.calls)
    assert any("attention" in k and "backward" in k for k in rec.calls)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_bf16_step_multiplies_in_bf16(family):
    model = tiny_bf16_model(family)
    batch = synthetic_batch(model)
    opt = _optimizer(model)
    one_step(model, batch, opt)  # warm-up: the optimizer's moments are created lazily
    with MatmulDtypes() as rec:
        loss = one_step(model, batch, opt)
    _assert_bf16(rec, loss)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_packed_step_through_the_collator(qwen_tokenizer_dir, lora):
    """Qwen2.5-VL, the trainer's packed batch (real samples from the sample builder, the collator's packing mode
    with its masked dummy video), full fine-tuning and LoRA on the language model."""
    import sys
    from pathlib import Path

    from transformers import AutoProcessor

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from gpu_bench import make_samples

    from qwenvl.data.collate import DataCollator, pop_batch_stats

    tok = AutoProcessor.from_pretrained(qwen_tokenizer_dir).tokenizer
    samples = make_samples(tok, 4, True, 0, 16 * 28 * 28, 4 * 28 * 28, "realistic")
    batch = DataCollator(pad_token_id=151643, mode="packing", model_max_length=4096)(samples)
    pop_batch_stats(batch)
    model = tiny_bf16_model("qwen2_5_vl", lora=lora)
    opt = _optimizer(model)
    one_step(model, batch, opt)
    with MatmulDtypes() as rec:
        loss = one_step(model, batch, opt)
    _assert_bf16(rec, loss)
    assert rec.allowed, "the flash backward's fp32 log-sum-exp was expected (FP32_BY_DESIGN)"


def test_an_fp32_matmul_is_caught():
    """The check is not blind: an fp32 product inside the recorded region is reported with its operands."""
    a = torch.randn(4, 4, dtype=torch.bfloat16)
    with MatmulDtypes() as rec:
        _ = a.float() @ a.float()
        _ = a @ a
    assert rec.fp32 == Counter({("mm", "self", "torch.float32"): 1, ("mm", "mat2", "torch.float32"): 1})
    assert rec.calls["mm"] == 2


class _P:
    """A stand-in parameter on a device type (no memory, no CUDA needed)."""

    def __init__(self, device: str):
        self.device = torch.device(device)


def test_adamw_selection():
    from transformers.training_args import OptimizerNames

    from qwenvl.optim import adamw_kwargs, fused_device_types

    assert {"cuda", "cpu"} <= fused_device_types()
    assert adamw_kwargs("adamw_torch_fused", [_P("cuda"), _P("cuda:1")]) == {"fused": True}
    assert adamw_kwargs(OptimizerNames.ADAMW_TORCH_FUSED, [_P("cpu")]) == {"fused": True}
    # a device without a fused kernel: torch's own for-each / plain loop instead of an error at the first step
    assert adamw_kwargs("adamw_torch_fused", [_P("cuda"), _P("meta")]) == {"fused": False}
    # another --optim is the user's choice: transformers' kwargs stand
    assert adamw_kwargs("adamw_torch", [_P("cuda")]) == {}
    assert adamw_kwargs(OptimizerNames.ADAFACTOR, [_P("cpu")]) == {}


def test_the_trainer_steps_with_fused_adamw(tmp_path):
    """transformers 5.24's default --optim (adamw_torch_fused with torch >= 2.8) reaches QwenVLTrainer's own
    optimizer groups as torch.optim.AdamW(fused=True) - on this CPU as on CUDA."""
    from qwenvl.data.collate import DataCollator
    from qwenvl.optim import describe
    from qwenvl.train_args import TrainingArguments
    from qwenvl.trainer import QwenVLTrainer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", learning_rate=1e-4)
    assert str(getattr(args.optim, "value", args.optim)) == "adamw_torch_fused"
    model = tiny_bf16_model("qwen2_5_vl")
    trainer = QwenVLTrainer(model=model, args=args, train_dataset=[{}],
                            data_collator=DataCollator(pad_token_id=0))
    opt = trainer.create_optimizer()
    assert type(opt) is torch.optim.AdamW and opt.defaults["fused"] is True
    assert describe(opt) == "fused AdamW"
    assert {g["name"] for g in opt.param_groups} >= {"merger", "llm"}

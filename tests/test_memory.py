"""The memory estimate's static terms equal the bytes of the real tensors (tiny model, one AdamW step), per path:
full fine-tuning of each part combination, fp32 and bf16, LoRA on the language model (PEFT), and the ZeRO division
arithmetic; the activation model's constants stay tied to the code they describe."""

from __future__ import annotations

import pytest
import torch

from qwenvl import memory
from qwenvl.lora_rules import resolve_targets


def _measure(model, optimizer_cls=torch.optim.AdamW) -> dict[str, int]:
    """Bytes of the parameters, of the gradients after one backward, of the optimizer state after one step."""
    params = [p for p in model.parameters()]
    trained = [p for p in params if p.requires_grad]
    for p in trained:  # a gradient of the parameter's own shape and dtype, as backward leaves it
        p.grad = torch.ones_like(p)
    opt = optimizer_cls(trained, lr=1e-3)
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {"weights": sum(p.numel() * p.element_size() for p in params),
            "gradients": sum(p.grad.numel() * p.grad.element_size() for p in trained), "optimizer": state}


def _model(tiny_model_dir, dtype):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tune", [(False, True, True), (True, True, True), (False, True, False), (True, False, False)])
def test_static_terms_equal_the_real_tensors_full_fine_tuning(tiny_model_dir, dtype, tune):
    from qwenvl.model import apply_freezing

    model = _model(tiny_model_dir, dtype)
    apply_freezing(model, tune_mm_vision=tune[0], tune_mm_mlp=tune[1], tune_mm_llm=tune[2])
    real = _measure(model)
    setup = memory.Setup(bytes_per_value=dtype.itemsize)
    est = memory.estimate(tiny_model_dir, setup=setup, tune=dict(zip(("vision", "merger", "llm"), tune, strict=True)))
    assert {k: est.terms[k] for k in real} == real


def test_static_terms_equal_the_real_tensors_lora(tiny_model_dir):
    from qwenvl.lora import apply_lora
    from qwenvl.model import apply_freezing

    model = _model(tiny_model_dir, torch.bfloat16)
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False)
    plan = resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False, targets=["llm"])
    model = apply_lora(model, plan, r=8, alpha=16, dropout=0.0)
    real = _measure(model)
    est = memory.estimate(tiny_model_dir, setup=memory.Setup(bytes_per_value=2), tune={}, lora=plan, r=8)
    assert {k: est.terms[k] for k in real} == real


def test_zero_stages_divide_what_deepspeed_divides():
    shapes = {"model.layers.0.mlp.up_proj.weight": [64, 32], "visual.blocks.0.attn.qkv.weight": [96, 32]}
    trained = {"model.layers.0.mlp.up_proj.weight": True}
    n, m = 64 * 32, 96 * 32
    plain, _ = memory.static_terms(shapes, trained, memory.Setup(bytes_per_value=2, world_size=4))
    assert plain == {"weights": 2 * (n + m), "gradients": 2 * n, "optimizer": 4 * n + 4}
    z2, _ = memory.static_terms(shapes, trained, memory.Setup(bytes_per_value=2, world_size=4, zero_stage=2))
    assert z2 == {"weights": 2 * (n + m), "gradients": 2 * n // 4, "optimizer": 12 * n // 4}
    z3, _ = memory.static_terms(shapes, trained, memory.Setup(bytes_per_value=2, world_size=4, zero_stage=3))
    assert z3 == {"weights": 2 * (n + m) // 4, "gradients": 2 * n // 4, "optimizer": 12 * n // 4}
    off, host = memory.static_terms(shapes, trained, memory.Setup(bytes_per_value=2, world_size=4, zero_stage=3,
                                                                  offload_optimizer=True, offload_param=True))
    assert off["optimizer"] == off["weights"] == 0 and host == {"weights": 2 * (n + m) // 4, "optimizer": 12 * n // 4}
    q, _ = memory.static_terms(shapes, {}, memory.Setup(bytes_per_value=2, quantize="4bit"),
                               quantized={"model.layers.0.mlp.up_proj.weight"})
    assert q["weights"] == n // 2 + 4 * (n // 64) + 2 * m


def test_activation_model_follows_the_settings_and_the_code():
    from qwenvl.loss import CHUNK_BYTES

    assert memory.LOSS_CHUNK_BYTES == CHUNK_BYTES
    dims = memory.Dims.from_config({"text_config": {"hidden_size": 2048, "intermediate_size": 11008,
                                                    "num_hidden_layers": 36, "vocab_size": 151936},
                                    "vision_config": {"hidden_size": 1280, "depth": 32}})
    base = memory.activation_terms(dims, memory.Setup(tokens=8192))
    assert memory.activation_terms(dims, memory.Setup(tokens=16384))["activations"] > 1.9 * base["activations"]
    off = memory.activation_terms(dims, memory.Setup(tokens=8192, checkpointing=False))
    assert off["activations"] > 8 * base["activations"]
    vis = memory.activation_terms(dims, memory.Setup(tokens=8192, image_patches=10000))
    trains = memory.activation_terms(dims, memory.Setup(tokens=8192, image_patches=10000, vision_trains=True))
    assert 0 < vis["vision"] < trains["vision"]
    # the chunked loss head: bounded by its chunk, not by the tokens x vocabulary logits
    assert base["loss"] < 2 * 2**30 and memory.MemoryEstimate(base).biggest == "activations"  # never "runtime"


def test_sizes_and_hints():
    assert memory.parse_size("80GiB") == 80 * 2**30 and memory.parse_size("80 GB") == 80 * 10**9
    assert memory.parse_size("81920MiB") == 80 * 2**30 and memory.parse_size("80") == 80 * 2**30  # bare: GiB
    for bad in ("-1GiB", "0", "0GiB", "1e400GiB", "nan", "inf", "2e6TiB", "eighty", ""):
        with pytest.raises(ValueError):
            memory.parse_size(bad)
    est = memory.MemoryEstimate({"optimizer": 50 * 2**30, "activations": 2**30})
    assert "ZeRO-3" in memory.fit_hint(est, memory.Setup(world_size=8))
    assert "offload" in memory.fit_hint(est, memory.Setup(world_size=8, zero_stage=3))
    est = memory.MemoryEstimate({"activations": 50 * 2**30})
    assert "gradient_checkpointing" in memory.fit_hint(est, memory.Setup(checkpointing=False))
    assert est.lines()[0].startswith("GPU memory per rank ~ 50.0 GiB (activations 50.0 GiB;")


def test_print_args_shows_the_estimate_and_refuses_what_cannot_fit(tiny_model_dir, tmp_path):
    """The plan's estimate for the demo-like run; --gpu-memory refuses (one line, exit 2) a run that cannot fit,
    names the biggest term and a way out; a plan that fits passes; a bad size is one line too."""
    from typer.testing import CliRunner

    from vlsft.cli import app

    repo = tiny_model_dir.parents[1]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name_or_path: {tiny_model_dir}, tune_mm_mlp: true, tune_mm_llm: true}}\n"
                   f"data: {{dictionary: {repo / 'configs' / 'demo' / 'Dataset-Dictionary.json'}, "
                   f"model_max_length: 32768}}\ntraining: {{per_device_train_batch_size: 64, bf16: true}}\n"
                   f"output: {{dir: {tmp_path / 'out'}}}\n")
    r = CliRunner().invoke(app, ["print-args", "--config", str(cfg)])
    line = [x for x in r.output.splitlines() if x.startswith("# GPU memory per rank ~ ")]
    assert r.exit_code == 0 and line and "activations" in line[0], r.output
    r = CliRunner().invoke(app, ["print-args", "--config", str(cfg), "--gpu-memory", "8GiB"])
    assert r.exit_code == 2 and "the GPU has 8.0 GiB: the biggest term is activations" in r.output, r.output
    assert "data.model_max_length" in r.output and "Traceback" not in r.output
    assert CliRunner().invoke(app, ["print-args", "--config", str(cfg), "--gpu-memory", "1TiB"]).exit_code == 0
    r = CliRunner().invoke(app, ["print-args", "--config", str(cfg), "--gpu-memory", "lots"])
    assert r.exit_code == 2 and "--gpu-memory 'lots' is not a size" in r.output


def test_estimate_reproduces_the_recorded_gpu_peaks():
    """The first H200 run (benchmarks/RESULTS.md): the peak step's sizes as benchmarks/memory_calibration.py
    rebuilds them on the CPU; the estimate for that step (stock loss, as that run used) within 10 %."""
    from benchmarks.memory_calibration import MEASURED, shapes_3b

    shapes, cfg = shapes_3b()
    trained = {n: "visual" not in n or "merger" in n for n in shapes}
    peak_steps = {"padded": (12224, 25496), "flatten": (8377, 29412)}  # (tokens, image patches) of the peak step
    for mode, (tokens, patches) in peak_steps.items():
        setup = memory.Setup(bytes_per_value=2, tokens=tokens, image_patches=patches, chunked_loss=False)
        terms, _ = memory.static_terms(shapes, trained, setup)
        terms.update(memory.activation_terms(memory.Dims.from_config(cfg), setup))
        assert abs(sum(terms.values()) / memory.GIB / MEASURED[mode] - 1) < 0.10, (mode, terms)

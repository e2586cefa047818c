"""CPU cost of one training step: aten ops dispatched, attention calls (vision / language model, forward / backward)
and host syncs - what a GPU pays in kernel launches and stalls, counted with no GPU.

    python benchmarks/step_cost.py                       # the 3B geometry, 8 realistic samples, packed; both paths
    python benchmarks/step_cost.py --path fast --json cost.json
    python benchmarks/step_cost.py --samples 3 --mode flatten

Model: Qwen2.5-VL-3B's geometry - real depths (32 vision blocks with window 112 and full attention at 7/15/23/31,
36 decoder layers), real head counts, patch / merge / window sizes and the real 151,936-token vocabulary - with
narrow widths (vision head_dim 4, language head_dim 8) so it runs on a laptop CPU; the op count does not depend on
the widths. Data: ``benchmarks/gpu_bench.py``'s realistic length mix (seed 0, the same 8 samples as the GPU
profile of 2026-12-04) through the project's builder and collator. Recipe as the trainer: vision frozen, merger and
language model trained, activation checkpointing (non-reentrant) with ``enable_input_require_grads``, fused AdamW.
``--path stock``: transformers as loaded; ``--path fast``: the trainer's path
(:func:`qwenvl.attention.prepare_for_training` and the chunked loss head of :mod:`qwenvl.loss`); ``--path both`` (default) prints both and the ratios. Counts one step after a warm-up step.
Host syncs: ``.item()`` / ``.tolist()`` and the ops whose output size depends on data (nonzero, boolean
indexing, unique, repeat_interleave without output_size).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VISION_HEAD_DIM = 4
TEXT_HEAD_DIM = 8
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive")


def config_3b_narrow():
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=151936, hidden_size=16 * TEXT_HEAD_DIM, intermediate_size=256, num_hidden_layers=36,
                num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]},
                bos_token_id=151643, eos_token_id=151645, use_cache=False)
    vision = dict(depth=32, hidden_size=16 * VISION_HEAD_DIM, intermediate_size=128, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=16 * TEXT_HEAD_DIM,
                  fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                            vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654,
                            image_token_id=151655, video_token_id=151656)


def _caller() -> str:
    """file:line of the first frame outside torch and this file (where a host sync was asked for)."""
    f = sys._getframe(2)
    while f is not None and ("/torch/" in f.f_code.co_filename or f.f_code.co_filename == __file__):
        f = f.f_back
    return f"{Path(f.f_code.co_filename).name}:{f.f_lineno}" if f is not None else "?"


class CostCounter:
    """A TorchDispatchMode counting every aten op, the attention ops by side (vision / language model, told apart
    by head_dim) and direction, and the host-sync ops; ``.tolist()`` calls are counted by a wrapper."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter._see(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()
        self.ops = 0
        self.by_op: Counter = Counter()
        self.attention = Counter()
        self.syncs = 0
        self.sync_sites: Counter = Counter()

    def _see(self, func, args) -> None:
        name = func.__name__  # e.g. "_scaled_dot_product_flash_attention_for_cpu.default"
        base = name.split(".")[0]
        self.ops += 1
        self.by_op[base] += 1
        if "scaled_dot_product" in base or "_attention" in base:
            direction = "backward" if "backward" in base else "forward"
            q = args[1] if direction == "backward" and len(args) > 1 else args[0]
            side = "vision" if getattr(q, "shape", (0,))[-1] == VISION_HEAD_DIM else "llm"
            self.attention[f"{side}_{direction}"] += 1
        if base in SYNC_OPS:
            self.syncs += 1
            self.sync_sites[f"{base} at {_caller()}"] += 1

    def __enter__(self):
        import torch

        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t, *a, **k):
            counter.syncs += 1
            counter.sync_sites[f"tolist at {_caller()}"] += 1
            return counter._tolist(t, *a, **k)

        torch.Tensor.tolist = tolist
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        self.mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist
        return False

    def result(self) -> dict:
        return {"aten_ops": self.ops, "host_syncs": self.syncs,
                "attention_calls": {k: self.attention.get(k, 0) for k in
                                    ("vision_forward", "vision_backward", "llm_forward", "llm_backward")},
                "top_ops": dict(self.by_op.most_common(8)), "top_sync_sites": dict(self.sync_sites.most_common(6))}


def build(path: str, seed: int = 0):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from qwenvl.attention import prepare_for_training
    from qwenvl.model import apply_freezing

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config_3b_narrow(), dtype=torch.float32,
                                                            attn_implementation="sdpa")
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    apply_freezing(model, tune_mm_vision=False, tune_mm_mlp=True, tune_mm_llm=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if path == "fast":  # the trainer's path: qwenvl.attention + the chunked loss head (qwenvl.loss)
        from qwenvl import loss as qloss

        prepare_for_training(model)
        qloss.install(model)
    model.train()
    return model


def batch_of(n: int, mode: str, seed: int = 0) -> dict:
    from gpu_bench import make_samples, tokenizer_dir
    from transformers import AutoProcessor

    from qwenvl.data.collate import DataCollator, pop_batch_stats

    tok = AutoProcessor.from_pretrained(tokenizer_dir()).tokenizer
    samples = make_samples(tok, n, False, seed, 1280 * 28 * 28, 4 * 28 * 28, "realistic")
    collate = DataCollator(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 151643,
                           mode={"packed": "packing"}.get(mode, mode), model_max_length=32768)
    b = collate(samples)
    pop_batch_stats(b)
    b["use_cache"] = False
    return b


def one_step(model, batch, opt) -> float:
    from qwenvl import loss as qloss

    batch = dict(batch)
    labels = batch.pop("labels")
    with qloss.armed(labels):  # an installed head returns per-token losses, else logits (as in the trainer)
        loss = qloss.token_mean_loss(model(**batch), labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(path: str, batch: dict, seed: int = 0) -> dict:
    import torch

    from qwenvl.model import parameter_groups

    model = build(path, seed)
    # fused AdamW: the trainer's default (transformers' adamw_torch_fused with torch >= 2.8), CPU and CUDA; the
    # for-each AdamW reads every parameter's step counter on the host (one sync per parameter)
    opt = torch.optim.AdamW(parameter_groups(model, learning_rate=1e-5, weight_decay=0.0), lr=1e-5, fused=True)
    warm = one_step(model, batch, opt)  # warm-up: lazy state (optimizer moments) is not a per-step cost
    c = CostCounter()
    with c:
        loss = one_step(model, batch, opt)
    res = c.result()
    res.update(path=path, warmup_loss=round(warm, 6), loss=round(loss, 6),
               vision_layers=len(model.model.visual.blocks), llm_layers=model.config.text_config.num_hidden_layers)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", choices=("stock", "fast", "both"), default="both")
    p.add_argument("--samples", type=int, default=8, help="samples in the step (realistic mix, seed 0)")
    p.add_argument("--mode", choices=("packed", "flatten", "padded"), default="packed")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    batch = batch_of(a.samples, a.mode)
    info = {"samples": a.samples, "mode": a.mode, "tokens": int(batch["input_ids"].numel()),
            "image_patches": int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0,
            "images": int(batch["image_grid_thw"].shape[0]) if "image_grid_thw" in batch else 0}
    print(json.dumps(info), flush=True)
    results = []
    for path in (("stock", "fast") if a.path == "both" else (a.path,)):
        r = measure(path, batch)
        results.append(r)
        print(json.dumps(r), flush=True)
    if len(results) == 2:
        s, f = results
        info["ratios"] = {"aten_ops": round(s["aten_ops"] / max(f["aten_ops"], 1), 2),
                          "host_syncs": round(s["host_syncs"] / max(f["host_syncs"], 1), 2)}
        print(f"\n{'':<28}{'stock':>12}{'fast':>12}")
        for key in ("aten_ops", "host_syncs"):
            print(f"{key:<28}{s[key]:>12,}{f[key]:>12,}")
        for key in s["attention_calls"]:
            print(f"{'attention ' + key:<28}{s['attention_calls'][key]:>12,}{f['attention_calls'][key]:>12,}")
        print(f"{'loss (same weights, step 2)':<28}{s['loss']:>12.6f}{f['loss']:>12.6f}")
        print(f"aten ops {info['ratios']['aten_ops']}x fewer, host syncs {info['ratios']['host_syncs']}x fewer")
    if a.json:
        Path(a.json).write_text(json.dumps({"info": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

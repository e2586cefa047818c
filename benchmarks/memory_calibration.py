"""The memory estimate (qwenvl/memory.py) against the GPU peaks recorded in benchmarks/RESULTS.md.

Rebuilds on the CPU exactly the steps the GPU bench timed (Qwen2.5-VL-3B shape, the realistic length mix, 8
samples a step, 3 warm-up + 20 timed steps, padded and flatten collation), finds the step with the most tokens (the
one that sets the peak), and prints the estimate for it next to the measured peak. The first GPU run used
transformers' stock loss (full ``tokens x vocabulary`` logits), so the estimate is computed for that loss here.

    python benchmarks/memory_calibration.py            # about a minute on 2 cores (tokenizer + synthetic images)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# (mode, measured peak GiB) of the first H200 run: benchmarks/RESULTS.md, ../shared/reference/gpu-h200-first-run
MEASURED = {"padded": 47.5, "flatten": 39.76}


def step_sizes(mode: str, steps: int = 23, batch: int = 8) -> dict:
    from transformers import AutoTokenizer

    from benchmarks.gpu_bench import make_samples, tokenizer_dir
    from qwenvl.data.collate import DataCollator, pop_batch_stats

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    samples = make_samples(tok, 64, False, 0, 1280 * 28 * 28, 4 * 28 * 28, "realistic")
    collate = DataCollator(pad_token_id=151643, mode=mode, model_max_length=32768)
    worst = {"tokens": 0}
    for step in range(steps):
        b = collate([samples[(step * batch + j) % len(samples)] for j in range(batch)])
        pop_batch_stats(b)
        tokens = int(b["input_ids"].numel())
        if tokens > worst["tokens"]:
            patches = int(b["pixel_values"].shape[0]) if "pixel_values" in b else 0
            worst = {"tokens": tokens, "real": int((b["labels"] != -100).sum()), "patches": patches}
    return worst


def shapes_3b() -> tuple[dict, dict]:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from benchmarks.gpu_bench import config_3b

    cfg = config_3b()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(cfg)
    return {n: list(p.shape) for n, p in model.named_parameters()}, cfg.to_dict()


def main() -> int:
    from qwenvl import memory

    shapes, cfg = shapes_3b()
    trained = {n: "visual" not in n or "merger" in n for n in shapes}  # merger + language model
    dims = memory.Dims.from_config(cfg)
    out = []
    for mode, peak in MEASURED.items():
        size = step_sizes(mode)
        setup = memory.Setup(bytes_per_value=2, tokens=size["tokens"], image_patches=size["patches"],
                             checkpointing=True, chunked_loss=False)
        terms, _ = memory.static_terms(shapes, trained, setup)
        terms.update(memory.activation_terms(dims, setup))
        total = sum(terms.values()) / memory.GIB
        row = {"mode": mode, **size, "estimate_gib": round(total, 2), "measured_gib": peak,
               "error": round(total / peak - 1, 3), "terms_gib": {k: round(v / memory.GIB, 2) for k, v in terms.items()}}
        out.append(row)
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

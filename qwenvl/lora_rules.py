"""LoRA rules that need no torch: the target grammar, the refusals, and trainable counts from safetensors headers.

``vlsft print-args`` and the trainer's pre-flight (:mod:`qwenvl.prechecks`) use these; :mod:`qwenvl.lora` (PEFT,
torch) re-exports them for the trainer side. The rules themselves are described in :mod:`qwenvl.lora`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from qwenvl.families import PARTS
from qwenvl.problems import UserError

TUNE_FLAG = {"vision": "tune_mm_vision", "merger": "tune_mm_mlp", "llm": "tune_mm_llm"}
QUANTIZE = ("4bit", "8bit")
PARTS_FILE = "trained_parts.safetensors"


class LoraConfigError(UserError, ValueError):
    """A LoRA setting that cannot work (one line)."""


@dataclass(frozen=True)
class LoraPlan:
    """What a run trains: adapters on ``targets`` (or on the modules ``regex`` matches), ``full`` parts in full."""

    targets: tuple[str, ...]
    full: tuple[str, ...]
    regex: str | None = None


def parse_targets(value) -> tuple[str, ...]:
    """``"llm,merger"`` / ``["llm", "merger"]`` -> ``("merger", "llm")`` in :data:`PARTS` order; unknown names refused."""
    if value is None:
        return ("llm",)
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", ",").split(",")
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    alias = {"language_model": "llm", "lm": "llm", "visual": "vision", "vit": "vision", "projector": "merger",
             "mlp": "merger"}
    names = [alias.get(n, n) for n in names]
    bad = [n for n in names if n not in PARTS]
    if bad:
        raise LoraConfigError(f"lora targets {', '.join(bad)}: unknown part; choose from llm, vision, merger "
                              "(e.g. targets: [llm] or lora_targets llm,merger)")
    if not names:
        raise LoraConfigError("lora targets is empty: name at least one of llm, vision, merger")
    return tuple(p for p in PARTS if p in names)


def resolve_targets(*, tune_mm_vision: bool, tune_mm_mlp: bool, tune_mm_llm: bool, targets=None,
                    target_modules: str | None = None, official: bool = False) -> LoraPlan:
    """The parts that get adapters and the parts trained in full, or :class:`LoraConfigError` (one line).

    ``official``: the trainer's standalone arguments with ``lora_targets`` unset (see the module docstring)."""
    tune = {"vision": tune_mm_vision, "merger": tune_mm_mlp, "llm": tune_mm_llm}
    if target_modules:
        try:
            re.compile(target_modules)
        except re.error as e:
            raise LoraConfigError(f"lora target_modules {target_modules!r} is not a valid regular expression: {e}") \
                from None
    parts = parse_targets(targets)
    if official and targets is None and not target_modules:
        tune["llm"] = False  # the official scripts' tune_mm_llm True + lora_enable: the LLM trains through LoRA
    if not target_modules:
        both = [p for p in parts if tune[p]]
        if both:
            p = both[0]
            raise LoraConfigError(f"{TUNE_FLAG[p]} is true and lora targets include {p}: a part is either trained "
                                  f"in full or gets LoRA adapters; set {TUNE_FLAG[p]} false or drop {p} from the "
                                  "lora targets")
    full = tuple(p for p in PARTS if tune[p])
    return LoraPlan(targets=parts if not target_modules else (), full=full, regex=target_modules or None)


def quantize_problem(quantize: str | None, *, cuda: bool, bitsandbytes: bool) -> str | None:
    """Why QLoRA (``quantize``) cannot run here, or None."""
    if quantize in (None, "", "none"):
        return None
    if quantize not in QUANTIZE:
        return f"lora quantize {quantize!r} is not one of 4bit, 8bit (or none)"
    if not cuda:
        return (f"lora quantize {quantize} (QLoRA) needs a CUDA GPU and bitsandbytes, and this machine has no CUDA "
                "GPU: train plain LoRA (quantize: none) here, or run on a GPU machine")
    if not bitsandbytes:
        return f"lora quantize {quantize} (QLoRA) needs bitsandbytes: pip install bitsandbytes (or quantize: none)"
    return None


def quantize_conflict(quantize: str | None, plan: LoraPlan, deepspeed: bool = False) -> str | None:
    """QLoRA quantizes the language model's frozen weights: it cannot also be trained in full."""
    if quantize in (None, "", "none"):
        return None
    if "llm" in plan.full:
        return (f"lora quantize {quantize} quantizes the language model, which tune_mm_llm trains in full: set "
                "tune_mm_llm false (its adapters train it) or quantize none")
    return None


# ---------------------------------------------------------------------------------------------------
# torch-free parameter counts from the model folder's safetensors headers
# ---------------------------------------------------------------------------------------------------
def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > 100 << 20:
            raise ValueError("safetensors header too large")
        return json.loads(f.read(n))


def weight_shapes(model_dir: str | os.PathLike) -> dict[str, list[int]]:
    """Every saved tensor's shape (saved key names), read from the safetensors headers only (no torch)."""
    d = Path(model_dir)
    files = sorted(d.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith(("adapter_", "trained_parts"))]
    shapes: dict[str, list[int]] = {}
    for f in files:
        for k, v in _header(f).items():
            if k != "__metadata__" and isinstance(v, dict):
                shapes[k] = list(v.get("shape", []))
    return shapes


def saved_part(key: str) -> str:
    """The part of a saved (standard Hugging Face) key or a runtime parameter name."""
    if "visual." in key or key.startswith("visual"):
        return "merger" if (".merger." in key or "deepstack_merger" in key) else "vision"
    return "llm"


def runtime_name(key: str) -> str:
    """A saved key -> the module path inside the transformers 5 model (``visual.*`` -> ``model.visual.*``,
    ``model.layers.*`` -> ``model.language_model.layers.*``), for matching ``lora_target_modules``."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not key.startswith(("model.visual.", "model.language_model.")):
        return "model.language_model." + key[len("model."):]
    return key


def is_linear_weight(name: str, shape: list[int]) -> bool:
    """A linear layer's weight as saved: 2-D ``*.weight``, not an embedding and not ``lm_head``."""
    return (len(shape) == 2 and name.endswith(".weight") and "embed" not in name.rsplit(".", 2)[-2]
            and not name.startswith("lm_head") and "lm_head" not in name)


def linear_module_matches(module: str, part: str, plan: LoraPlan) -> bool:
    if plan.regex:
        return re.fullmatch(plan.regex, module) is not None
    return part in plan.targets


def linear_modules(model_dir: str | os.PathLike) -> dict[str, str]:
    """Module name inside the transformers model -> part, for every linear layer that can get an adapter
    (``lm_head`` excluded), from the safetensors headers (no torch). Empty when the folder has no weights."""
    return {runtime_name(k)[: -len(".weight")]: saved_part(k) for k, shape in weight_shapes(model_dir).items()
            if is_linear_weight(k, shape)}


def target_modules_problem(model_dir: str | os.PathLike, plan: LoraPlan) -> tuple[str, str] | None:
    """``(message, hint)`` when ``plan.regex`` matches no linear layer of the model in ``model_dir`` (or one of a
    part trained in full), judged from the safetensors headers; None when it is fine or the folder has no
    weights to read (e.g. before ``model.build_tiny`` builds it)."""
    if not plan.regex:
        return None
    try:
        modules = linear_modules(model_dir)
    except (OSError, ValueError, KeyError, struct.error):
        return None
    if not modules:
        return None
    rx = re.compile(plan.regex)
    matched = [n for n in modules if rx.fullmatch(n)]
    if matched:
        both = [n for n in matched if modules[n] in plan.full]
        if both:
            p = modules[both[0]]
            return (f"lora target_modules {plan.regex!r} matches {both[0]} (part {p}), which {TUNE_FLAG[p]} trains in "
                    "full", f"a part is either trained in full or gets adapters: set {TUNE_FLAG[p]} false or narrow "
                    "the regular expression")
        return None
    # a few names that exist: the first module of each kind (q_proj, qkv, fc1, ...), language model first
    examples: dict[str, str] = {}
    per_part: dict[str, list[str]] = {p: [] for p in PARTS}
    for name, part in modules.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in examples:
            examples[leaf] = name
            per_part[part].append(name)
    shown = per_part["llm"][:2] + per_part["vision"][:1] + per_part["merger"][:1]
    hint = None
    searched = [n for n in modules if rx.search(n)]
    if searched:
        hint = (f"the pattern is matched against the whole module name (it only occurs inside {searched[0]}): "
                f"did you mean '.*{plan.regex}'?")
    else:
        from qwenvl.problems import did_you_mean

        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", plan.regex):
            guess = did_you_mean(word, examples) if word not in examples else None
            if guess:
                hint = f"{guess[:-1]} (for {word!r})?"
                break
    hint = (hint + "; " if hint else "") + "module names here: " + ", ".join(shown)
    return f"lora target_modules {plan.regex!r} matches no linear layer of {model_dir}", hint


def parameter_report(model_dir: str | os.PathLike, *, plan: LoraPlan | None, tune: dict[str, bool], r: int = 64,
                     use_dora: bool = False) -> dict[str, dict[str, int]]:
    """Per part: ``total`` base parameters, ``full`` (trained in full), ``lora`` (adapter parameters), from the
    safetensors headers (exact; no torch). ``plan`` None: no LoRA (``tune`` decides)."""
    shapes = weight_shapes(model_dir)
    if not shapes:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    out = {p: {"total": 0, "full": 0, "lora": 0} for p in PARTS}
    full_parts = set(plan.full) if plan is not None else {p for p in PARTS if tune.get(p)}
    for key, shape in shapes.items():
        part = saved_part(key)
        n = 1
        for s in shape:
            n *= int(s)
        out[part]["total"] += n
        if part in full_parts:
            out[part]["full"] += n
        elif plan is not None and is_linear_weight(key, shape):
            module = runtime_name(key)[: -len(".weight")]
            if linear_module_matches(module, part, plan):
                out_f, in_f = int(shape[0]), int(shape[1])
                out[part]["lora"] += r * (in_f + out_f) + (out_f if use_dora else 0)
    return out


def format_report(report: dict[str, dict[str, int]]) -> list[str]:
    """``trainable parameters: ...`` lines (count and % of the model per part, then the total)."""
    total = sum(v["total"] for v in report.values())
    lines = []
    for part in PARTS:
        v = report[part]
        trained = v["full"] + v["lora"]
        how = "full" if v["full"] else ("LoRA adapters" if v["lora"] else "frozen")
        share = 100.0 * trained / max(v["total"], 1)
        lines.append(f"#   {part:<6} {trained:>15,} of {v['total']:>15,} ({share:6.2f} % of the part, {how})")
    trained = sum(v["full"] + v["lora"] for v in report.values())
    lines.append(f"#   total  {trained:>15,} of {total:>15,} ({100.0 * trained / max(total, 1):6.2f} % of the model)")
    return lines

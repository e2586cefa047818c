"""Checks of a run's inputs that need no torch: the front door (``vlsft print-args`` / ``train``) runs them
before any rank starts, so a config that would fail inside the ranks fails here first, in one line.

Each check returns ``None`` (fine) or a ``(message, hint)`` pair. The trainer (``python -m qwenvl.train``, also
used standalone) calls the same rules where they need no more than its arguments (:func:`wandb_can_log_in`,
:func:`nothing_to_train`, :func:`zero_stage`, :data:`REPORT_INTEGRATIONS`) and asks the installed libraries for
the rest, in its own words (flag names instead of run YAML keys).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path

from qwenvl.problems import did_you_mean

# transformers' report_to integrations (its INTEGRATION_TO_CALLBACK; tests/test_prechecks.py compares) -> the pip
# package each needs; the trainer's --report_to check names the same packages
REPORT_INTEGRATIONS: dict[str, str] = {
    "azure_ml": "azureml-core", "clearml": "clearml", "codecarbon": "codecarbon", "comet_ml": "comet_ml",
    "dagshub": "dagshub", "dvclive": "dvclive", "flyte": "flytekit", "kubeflow": "kubeflow", "mlflow": "mlflow",
    "neptune": "neptune", "swanlab": "swanlab", "tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb",
}
# the module whose presence transformers checks for an integration (where it differs from the name)
_REPORT_MODULES = {"azure_ml": "azureml", "flyte": "flytekit", "tensorboard": ("tensorboard", "tensorboardX")}
WANDB_OFF_MODES = ("offline", "disabled", "dryrun")

Found = tuple[str, str | None] | None


def report_to_problem(name: str | None) -> Found:
    """An unknown integration, or one whose package is not installed."""
    if name is None or name in ("none", "all"):
        return None
    if name not in REPORT_INTEGRATIONS:
        return (f"report_to {name!r} is not a known integration",
                did_you_mean(name, [*REPORT_INTEGRATIONS, "none", "all"])
                or "one of: none, all, " + ", ".join(sorted(REPORT_INTEGRATIONS)))
    modules = _REPORT_MODULES.get(name, name)
    modules = (modules,) if isinstance(modules, str) else modules
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        package = REPORT_INTEGRATIONS[name]
        return (f"report_to {name} needs the {package} package, which is not installed in this environment",
                f"pip install {package}, or report_to none")
    return None


def wandb_can_log_in(environ: Mapping[str, str]) -> bool:
    """An online W&B run needs a key: WANDB_API_KEY, or the netrc entry that `wandb login` writes."""
    if environ.get("WANDB_MODE", "").lower() in WANDB_OFF_MODES or \
            environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return True
    if environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        auth = netrc.netrc(environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


#: the trainer's line for :func:`nothing_to_train` (the front door says it in run YAML keys: ``nothing is trainable``)
NOTHING_TO_TRAIN = "nothing to train: set at least one of tune_mm_vision, tune_mm_mlp, tune_mm_llm to True"


def nothing_to_train(*, tune_mm_vision: bool, tune_mm_mlp: bool, tune_mm_llm: bool, lora: bool) -> bool:
    """No part trained in full and no LoRA adapters: every parameter would stay frozen. The front door refuses it
    before launching, the trainer before loading the model (and again if the loaded model has no trainable
    parameter)."""
    return not (lora or tune_mm_vision or tune_mm_mlp or tune_mm_llm)


def deepspeed_json_problem(path: str) -> Found:
    """A DeepSpeed config that DeepSpeed would fail on in every rank: unreadable, not JSON, not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        return f"DeepSpeed config {path} cannot be read: {exc.strerror or exc}", "check the path and its permissions"
    except UnicodeDecodeError:
        return f"DeepSpeed config {path} is not UTF-8 text", "a DeepSpeed config is a JSON file"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return (f"DeepSpeed config {path}:{exc.lineno}:{exc.colno} is not valid JSON: {exc.msg}",
                "start from configs/zero3.json (JSON has no comments and no trailing commas)")
    if not isinstance(data, dict):
        return f"DeepSpeed config {path} must hold a JSON object, got {type(data).__name__}", "see configs/zero3.json"
    return None


def precision_problem(bf16: bool, extra: Mapping[str, object]) -> Found:
    """bf16 and fp16 together (transformers refuses it in every rank)."""
    def on(value) -> bool:
        return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "1", "yes"))

    if (bf16 or on(extra.get("bf16"))) and on(extra.get("fp16")):
        return ("bf16 and fp16 are both on: choose one precision",
                "delete training.extra.fp16 (bf16 is the choice on Ampere and newer GPUs)")
    return None


def model_folder_problem(path: str) -> Found:
    """A local model folder the trainer cannot load: no config.json, unreadable, or an unsupported family."""
    from qwenvl.families import read_model_type
    from qwenvl.problems import UserError

    if not os.path.isdir(path):
        return (f"{path} is not a local directory", "a model folder, or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct "
                "(`vlsft train` downloads it into the Hugging Face cache)")
    try:
        read_model_type(path)
    except UserError as exc:
        return str(exc).splitlines()[0], "point model.name_or_path at a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model folder"
    return None


def cuda_visible() -> bool:
    """A CUDA GPU on this machine, judged without torch (the NVIDIA driver's files)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def lora_problems(*, tune_mm_vision: bool, tune_mm_mlp: bool, tune_mm_llm: bool, targets, target_modules,
                  quantize, deepspeed: bool = False) -> list[tuple[str, str, str | None]]:
    """LoRA settings the ranks would refuse: ``(yaml key, message, hint)`` for each (see :mod:`qwenvl.lora`).
    Conflicts between a fully-trained part and its adapters, an invalid regex, QLoRA without CUDA/bitsandbytes."""
    from qwenvl.lora_rules import LoraConfigError, quantize_conflict, quantize_problem, resolve_targets

    found: list[tuple[str, str, str | None]] = []
    plan = None
    try:
        plan = resolve_targets(tune_mm_vision=tune_mm_vision, tune_mm_mlp=tune_mm_mlp, tune_mm_llm=tune_mm_llm,
                               targets=targets, target_modules=target_modules)
    except LoraConfigError as exc:
        key = "model.lora.target_modules" if "target_modules" in str(exc) else "model.lora.targets"
        message, _, hint = str(exc).partition("; ")
        found.append((key, message, hint or None))
    problem = quantize_problem(quantize, cuda=cuda_visible(),
                               bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)
    if problem is None and plan is not None:
        problem = quantize_conflict(quantize, plan, deepspeed)
    if problem:
        message, _, hint = problem.partition(": ")
        found.append(("model.lora.quantize", message, hint or None))
    return found


def zero_stage(deepspeed) -> int | None:
    """``zero_optimization.stage`` of a DeepSpeed config (a JSON path, a JSON string or a dict), None when unknown."""
    data = deepspeed
    if isinstance(deepspeed, (str, os.PathLike)):
        text = str(deepspeed)
        try:
            data = json.loads(text) if text.lstrip().startswith("{") else json.loads(Path(text).read_text("utf-8"))
        except (OSError, ValueError):
            return None
    stage = data.get("zero_optimization", {}).get("stage") if isinstance(data, dict) else None
    try:
        return int(stage) if stage is not None else None
    except (TypeError, ValueError):
        return None


def family_problems(model_type: str, *, data_flatten: bool, data_packing: bool,
                    zero_stage: int | None) -> list[tuple[str, str, str | None]]:
    """What this model family cannot do with these settings: ``(yaml key, message, hint)`` each (the trainer
    checks the same rules: :meth:`qwenvl.families.Family.batching_problem` / ``deepspeed_problem``)."""
    from qwenvl.families import family

    fam = family(model_type)
    found: list[tuple[str, str, str | None]] = []
    msg = fam.batching_problem(data_flatten=data_flatten, data_packing=data_packing)
    if msg:
        message, _, hint = msg.partition(": use ")
        found.append(("data.packing" if data_packing else "data.flatten", message, ("use " + hint) if hint else None))
    msg = fam.deepspeed_problem(zero_stage)
    if msg:
        message, _, hint = msg.partition("; use ")
        found.append(("distributed.deepspeed", message, ("use " + hint) if hint else None))
    return found


def same_folder(a: str | os.PathLike | None, b: str | os.PathLike | None) -> bool:
    """Whether two local paths name one existing folder (links and ``..`` resolved); False for URLs, hub ids and
    folders that do not exist."""
    if not a or not b or "://" in str(a) or "://" in str(b):
        return False
    try:
        return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)
    except OSError:
        return False

"""Fine-tune the Qwen vision-language families of :mod:`qwenvl.families` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
Qwen3-VL MoE, Qwen3.5 and Qwen3.5 MoE) with ``transformers.Trainer`` (+ DeepSpeed).

Run on every rank by torchrun (``vlsft train`` builds this command from a run YAML)::

    torchrun --nnodes 1 --nproc_per_node 8 --node_rank 0 --master_addr 127.0.0.1 --master_port 29500 \\
        -m qwenvl.train \\
        --model_name_or_path /models/Qwen2.5-VL-7B-Instruct \\
        --dataset_dict data/Dataset-Dictionary.json --dataset_use "docs%50,charts" \\
        --tune_mm_vision False --tune_mm_mlp True --tune_mm_llm True \\
        --deepspeed configs/zero3.json --bf16 True \\
        --output_dir runs/my-run --learning_rate 2e-5 --mm_projector_lr 1e-5 \\
        --per_device_train_batch_size 4 --gradient_accumulation_steps 4 --num_train_epochs 1 \\
        --save_steps 500 --logging_steps 10 --report_to wandb --run_name my-run

(``python qwenvl/train.py ...`` works as well.) Arguments: the model and data arguments of
:mod:`qwenvl.arguments` and every ``transformers.TrainingArguments`` plus ``--mm_projector_lr``,
``--vision_tower_lr``, ``--resume auto|never|PATH`` and ``--overwrite_output_dir`` (:mod:`qwenvl.train_args`).

* The model class comes from ``config.json`` (``model_type``); freezing follows the three
  ``--tune_mm_*`` flags exactly (:mod:`qwenvl.model`). A model folder without
  ``preprocessor_config.json`` (e.g. saved by the official trainer) gets its family's default processor
  settings, with the patch sizes of its config.json.
* ``--deepspeed`` takes a JSON path or a shipped name (``zero2``, ``zero3``, ``zero3_offload``); one
  process started without torchrun works too. The official scripts' argument line is accepted as is
  (``--gradient_checkpointing`` -> ``activation_checkpointing``, ``--warmup_ratio`` -> ``warmup_steps``,
  ``--cache_dir`` ignored).
* LoRA (:mod:`qwenvl.lora`, PEFT): ``--lora_enable True`` puts adapters on the parts ``--lora_targets`` names
  (default: the language model, all its linear layers; as the official ``--lora_enable --lora_r 64 --lora_alpha
  128 --lora_dropout 0.0`` line) while the ``--tune_mm_*`` parts are trained in full; checkpoints hold the adapter
  (PEFT layout), ``trained_parts.safetensors`` and ``vlsft-lora.json``; ``vlsft export`` merges.
* Input problems end the run before anything heavy is loaded, with one ``error:`` line and exit status 2:
  nothing to train, a missing ``--deepspeed`` file, ``--report_to`` naming an unknown or uninstalled
  integration, ``--eval_strategy`` other than ``no`` without eval data (``--eval_split`` /
  ``--eval_dataset_use``), invalid argument combinations,
  an unreadable or unsupported ``config.json``, an unavailable attention kernel; during training, more bad
  samples than ``--max_bad_sample_ratio`` allows (summed over ranks each step; stop when the 99 % Clopper-Pearson lower
  bound of the bad fraction exceeds it).
* Evaluation: ``--eval_split F`` holds out a seeded fraction of each training dataset (listed in
  ``<output_dir>/logs/eval-split.json``; never trained on, the same on every rank and on resume),
  ``--eval_dataset_use a,b%50`` adds datasets of the dictionary; ``--eval_strategy steps --eval_steps N``
  (or ``epoch``) evaluates them: ``eval_loss`` plus per-dataset losses (see :mod:`qwenvl.trainer`).
* ``--resume auto`` (default) continues from the newest *complete* checkpoint in ``output_dir``
  (one with ``trainer_state.json`` and weights; a half-written one is skipped). ``never`` starts fresh,
  PATH continues from that checkpoint. A fresh start into an ``output_dir`` that already holds
  checkpoints or a model is refused unless ``--overwrite_output_dir True`` (nothing is deleted; with
  overwrite, the earlier ``checkpoint-*`` folders are moved into ``superseded-<time>/`` first).
* The final ``output_dir`` holds the model (standard Hugging Face key names), tokenizer, processor
  and chat template: ``AutoProcessor`` / ``AutoModelForImageTextToText`` load it.
* Without CUDA (CPU runs, tests, the demo): DeepSpeed runs over gloo (accelerate is handed a
  ready ``PartialState(backend="gloo")``), bf16 is switched on in the DeepSpeed config rather than
  in the arguments, and each rank ends with ``barrier()`` + ``destroy_process_group()``.
* Test hook: ``VLSFT_TEST_CRASH_RANK=R`` makes rank R exit with status 3 after model loading
  (to check that one dead rank ends the whole job).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python qwenvl/train.py` / `torchrun qwenvl/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("qwenvl.train")

from qwenvl.problems import UserError  # noqa: E402  (re-exported: the one user-error base)
from qwenvl.runpolicy import (  # noqa: E402, F401  (torch-free run policy; re-exported for scripts and tests)
    DEEPSPEED_PRESETS,
    LOCK_ENV,
    MODEL_FILES,
    OutputLock,
    check_resumable,
    decide_resume,
    deepspeed_off,
    deepspeed_preset_path,
    is_complete_checkpoint,
    list_checkpoints,
    run_markers,
    set_aside_old_checkpoints,
)


# ---------------------------------------------------------------------------------------------------
# argument parsing with the CPU workarounds
# ---------------------------------------------------------------------------------------------------
def _argv_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def resolve_deepspeed_arg(argv: list[str]) -> list[str]:
    """``--deepspeed zero2|zero3|zero3_offload`` -> the shipped ``configs/<name>.json``; a missing file is a
    :class:`UserError` (transformers would fail later with an unrelated message)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--deepspeed" and i + 1 < len(out):
            j, value = i + 1, out[i + 1]
        elif a.startswith("--deepspeed="):
            j, value = i, a.split("=", 1)[1]
        else:
            continue
        if deepspeed_off(value) or value.lstrip().startswith("{") or Path(value).is_file():
            continue
        shipped = deepspeed_preset_path(value)
        if shipped is not None and shipped.is_file():
            out[j] = str(shipped) if j == i + 1 else f"--deepspeed={shipped}"
            continue
        raise UserError(f"--deepspeed {value}: no such file; give a DeepSpeed JSON path or one of "
                        f"{', '.join(DEEPSPEED_PRESETS)} (configs/<name>.json), or none")
    return out


def _prepare_cpu(argv: list[str]) -> None:
    """Before TrainingArguments exist: choose how a CUDA-less run distributes (see module docstring)."""
    import torch

    from qwenvl.train_args import TrainingArguments

    if torch.cuda.is_available():
        TrainingArguments._cpu_mode = None
        return
    ds = _argv_value(argv, "--deepspeed")
    if ds and not deepspeed_off(ds):
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        if "WORLD_SIZE" not in os.environ:  # one process started without torchrun: a group of one
            _single_process_group_env()
        from accelerate import PartialState

        PartialState(backend="gloo")
        TrainingArguments._cpu_mode = "deepspeed"
    else:
        TrainingArguments._cpu_mode = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def _single_process_group_env() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(k, v)


def parse_args(argv: list[str]):
    from transformers import HfArgumentParser

    from qwenvl.arguments import ModelArguments
    from qwenvl.data.arguments import DataArguments
    from qwenvl.train_args import TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments),
                              description="Fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL (see the module docstring).")
    for action in parser._actions:  # help texts such as 'name%50' must not be read as %-formats by --help
        if action.help:
            action.help = re.sub(r"%(?!\()", "%%", action.help)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        raise UserError("pass arguments as --name value (use `vlsft train --config run.yaml` for run YAMLs)")
    try:
        model_args, data_args, training_args, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True)
    except (ValueError, ImportError) as e:  # transformers' own checks of argument combinations
        raise UserError(f"invalid training arguments: {str(e).strip().splitlines()[0]}") from e
    if rest:
        raise UserError(unknown_arguments_message(rest, [o for act in parser._actions for o in act.option_strings]))
    if training_args.deepspeed and deepspeed_off(str(training_args.deepspeed)):
        training_args.deepspeed = None
    return model_args, data_args, training_args


def unknown_arguments_message(rest: list[str], accepted: list[str]) -> str:
    """One line for arguments the parser did not take, each ``--name`` with the nearest accepted one (e.g. an
    official argument spelt differently: ``--video_max_frame_pixel`` -> ``--video_max_frame_pixels``)."""
    import difflib

    names = sorted({o for o in accepted if o.startswith("--")})
    parts = []
    for tok in rest:
        if not tok.startswith("--"):
            continue
        flag = tok.split("=", 1)[0]
        near = difflib.get_close_matches(flag, names, n=1, cutoff=0.6)
        parts.append(f"{flag} (did you mean {near[0]}?)" if near else flag)
    shown = ", ".join(parts) if parts else " ".join(rest)
    return f"unknown trainer arguments: {shown} (see `python -m qwenvl.train --help`)"


# ---------------------------------------------------------------------------------------------------
# the run: a table of contents, then its steps in order
# ---------------------------------------------------------------------------------------------------
def run(argv: list[str]) -> int:
    """One rank's run: parse, refuse early, load the model and processor, apply the training mode (freezing, LoRA,
    the speed path), read the data, build the trainer, train and save (see the module docstring)."""
    argv = resolve_deepspeed_arg(argv)
    _prepare_cpu(argv)
    model_args, data_args, training_args = parse_args(argv)
    _setup_logging(training_args)
    logger.info("world size %d, process %d, device %s, distributed %s", training_args.world_size,
                training_args.process_index, training_args.device, training_args.distributed_state.distributed_type)
    lora_plan, eval_strategy = _refuse_early(model_args, data_args, training_args)
    settings: dict = {}
    checked: list = []  # the family, checked once: on a resume before the checkpoint is compared, else after

    def this_run() -> dict:  # (the family check after the output folder's own checks, as before)
        checked.append(_checked_family(model_args, data_args, training_args))
        settings.update(_run_settings(model_args, training_args, lora_plan, checked[0].model_type))
        return settings
    resume_from, recorded = _resume_point(training_args, this_run)
    if not checked:
        this_run()
    fam = checked[0]
    from transformers import set_seed

    set_seed(training_args.seed)
    PHASE["now"] = "loading the model"
    model, processor = _load_model_and_processor(model_args, data_args, training_args, fam, lora_plan)
    model = _apply_training_mode(model, model_args, training_args, lora_plan, fam.model_type)
    from qwenvl.model import trainable_counts

    settings["trainable"] = trainable_counts(model)  # another model size of the family: other shapes
    _check_settings(recorded, settings, ["trainable"])
    _crash_if_a_test_asks(training_args.process_index)
    PHASE["now"] = "reading the data"
    data, eval_dataset = _load_data(processor, data_args, training_args, fam.model_type, eval_strategy)
    PHASE["now"] = "building the trainer"
    trainer, save_lora = _build_trainer(model, processor, data, eval_dataset, model_args, training_args, lora_plan,
                                        resume_from)
    trainer.run_settings, trainer.run_schedule = settings, _schedule(training_args)
    PHASE["now"] = "training"
    summary = _train_and_save(trainer, processor, training_args, resume_from, save_lora)
    if training_args.process_index == 0:
        print(summary, flush=True)  # samples trained / skipped by kind, summed over ranks
    return 0


def _setup_logging(training_args) -> None:
    import transformers

    level = logging.INFO if training_args.process_index == 0 else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stderr)
    logging.getLogger("qwenvl").setLevel(level)
    transformers.utils.logging.set_verbosity(logging.WARNING if training_args.process_index == 0 else logging.ERROR)
    from qwenvl.noise import quiet_known_warnings

    quiet_known_warnings(training_args.process_index)


# ---- refuse early: one line each, before anything heavy is loaded
def _refuse_early(model_args, data_args, training_args):
    """Input problems as one :class:`UserError` line each; returns (the LoRA plan or None, the eval strategy)."""
    from qwenvl.prechecks import NOTHING_TO_TRAIN, nothing_to_train

    _check_report_to(training_args.report_to)
    eval_strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    wants_eval_data = bool(data_args.eval_split) or bool(str(data_args.eval_dataset_use or "").strip())
    if eval_strategy != "no" and not wants_eval_data:
        raise UserError(f"--eval_strategy {eval_strategy} needs eval data: set --eval_split (a held-out fraction, "
                        "e.g. 0.02) or --eval_dataset_use NAME[,...] (run YAML: data.eval_split / data.eval), or "
                        "use --eval_strategy no")
    if wants_eval_data and eval_strategy == "no" and training_args.process_index == 0:
        logger.warning("eval data is set (eval_split / eval_dataset_use) but --eval_strategy is no: it is never "
                       "evaluated; use --eval_strategy steps (with --eval_steps) or epoch")
    training_args.prediction_loss_only = True  # evaluation computes losses only (no logits gathered)
    for name in ("seed", "data_seed"):  # numpy / torch seeds: 0 .. 2**32 - 1 (set_seed raised in every rank)
        value = getattr(training_args, name, None)
        if value is not None and not 0 <= value < 2**32:
            raise UserError(f"--{name} {value} is out of range: seeds go from 0 to {2**32 - 1} (run YAML: "
                            f"{'training.seed' if name == 'seed' else 'data.seed'})")
    if training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise UserError(f"nothing to do: num_train_epochs {training_args.num_train_epochs:g} and no max_steps; "
                        "set num_train_epochs > 0 (fractions such as 0.5 work) or max_steps")
    from qwenvl.data.token_budget import budget_problem

    found = budget_problem(packing=data_args.data_packing, packing_rows=training_args.packing_rows)
    if found:  # a token budget needs packing (the trainer checks it too)
        raise UserError(f"{found[0]} ({found[1]})")
    lora_plan = _lora_plan(model_args, training_args)
    if nothing_to_train(tune_mm_vision=model_args.tune_mm_vision, tune_mm_mlp=model_args.tune_mm_mlp,
                        tune_mm_llm=model_args.tune_mm_llm, lora=lora_plan is not None):
        raise UserError(NOTHING_TO_TRAIN)
    model_args.model_name_or_path = os.path.expanduser(model_args.model_name_or_path)
    from qwenvl.prechecks import same_folder

    if same_folder(training_args.output_dir, model_args.model_name_or_path):
        raise UserError(f"output_dir {training_args.output_dir} is the model folder the run starts from "
                        "(--model_name_or_path): the final save would write over its weights and config; choose a "
                        "new output_dir")
    if Path(training_args.output_dir).exists() and not Path(training_args.output_dir).is_dir():
        raise UserError(f"output_dir {training_args.output_dir} is a file, not a folder: choose another output_dir")
    return lora_plan, eval_strategy


def _check_report_to(report_to) -> None:
    """``--report_to`` names an integration transformers knows and whose package is installed (else one line)."""
    from transformers import integrations

    from qwenvl.prechecks import REPORT_INTEGRATIONS, wandb_can_log_in

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    known = getattr(getattr(integrations, "integration_utils", integrations), "INTEGRATION_TO_CALLBACK", {})
    for name in names:
        if name in ("none", "all"):
            continue
        if known and name not in known:
            raise UserError(f"report_to {name!r} is not a known integration; use one of: none, "
                            + ", ".join(sorted(known)))
        available = getattr(integrations, f"is_{name}_available", None)
        if available is not None and not available():
            package = REPORT_INTEGRATIONS.get(name, name)
            raise UserError(f"report_to {name} needs the {package} package, which is not "
                            f"installed: `pip install {package}`, or choose report_to none")
        if name == "wandb" and not wandb_can_log_in(os.environ):
            raise UserError("report_to wandb: no W&B API key (WANDB_API_KEY, or `wandb login`); set it, or "
                            "WANDB_MODE=offline (sync later with `wandb sync`), or report_to none")


def _lora_plan(model_args, training_args):
    """The LoRA plan (:mod:`qwenvl.lora`), None without ``--lora_enable``; refusals are one line."""
    if not training_args.lora_enable:
        if str(training_args.lora_quantize or "none").lower() not in ("none", ""):
            raise UserError(f"--lora_quantize {training_args.lora_quantize} needs --lora_enable True (QLoRA trains "
                            "adapters over quantised weights); remove --lora_quantize for a full fine-tune")
        return None
    import importlib.util

    import torch

    from qwenvl import lora

    plan = lora.resolve_targets(tune_mm_vision=model_args.tune_mm_vision, tune_mm_mlp=model_args.tune_mm_mlp,
                                tune_mm_llm=model_args.tune_mm_llm, targets=training_args.lora_targets,
                                target_modules=training_args.lora_target_modules,
                                official=training_args.lora_targets is None)
    if model_args.tune_mm_llm and training_args.lora_targets is None and training_args.process_index == 0:
        logger.warning("lora_enable with tune_mm_llm True (the official LoRA scripts): the language model is "
                       "trained through its LoRA adapters, its base weights stay frozen")
    problem = lora.quantize_problem(training_args.lora_quantize, cuda=torch.cuda.is_available(),
                                    bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None)
    if problem is None:
        problem = lora.quantize_conflict(training_args.lora_quantize, plan, bool(training_args.deepspeed))
    if problem:
        raise UserError(problem)
    return plan


def _run_settings(model_args, training_args, lora_plan, model_type: str) -> dict:
    """What a checkpoint's weights and optimizer state depend on (recorded in its ``vlsft-run.json``, compared on
    resume): the model family, the parts trained in full, the LoRA setup (None: a full fine-tune)."""
    from qwenvl.lora_rules import PARTS

    if lora_plan is None:
        flags = {"vision": model_args.tune_mm_vision, "merger": model_args.tune_mm_mlp, "llm": model_args.tune_mm_llm}
        full, lora = [p for p in PARTS if flags.get(p)], None
    else:
        full = [p for p in PARTS if p in lora_plan.full]
        lora = {"r": int(training_args.lora_r), "targets": [p for p in PARTS if p in lora_plan.targets],
                "modules": lora_plan.regex, "dora": bool(training_args.lora_use_dora)}
    return {"model_type": model_type, "trained_in_full": full, "lora": lora}


def _schedule(training_args) -> dict:
    """The learning-rate settings (a resume keeps the checkpoint's base lrs: :func:`_warn_schedule`)."""
    from qwenvl.runpolicy import SCHEDULE_KEYS

    out = {}
    for k in SCHEDULE_KEYS:
        v = getattr(training_args, k, None)
        out[k] = getattr(v, "value", v)
    return out


def _old_schedule(checkpoint: str) -> dict | None:
    """A checkpoint without ``vlsft-run.json`` (older vlsft): the lr settings from its ``training_args.bin``."""
    path = Path(checkpoint) / "training_args.bin"
    if not path.is_file():
        return None
    try:
        import torch

        return _schedule(torch.load(path, map_location="cpu", weights_only=False))
    except Exception:  # noqa: BLE001 - only a warning depends on it
        return None


def _check_settings(recorded: tuple[str, dict] | None, settings: dict, keys=None) -> None:
    from qwenvl.runpolicy import settings_mismatch

    if recorded:
        problem = settings_mismatch(recorded[0], recorded[1].get("settings"), settings, keys)
        if problem:
            raise UserError(problem)


def _warn_schedule(checkpoint: str, recorded: dict | None, training_args) -> None:
    """Rank 0: one warning line when the lr settings differ from the checkpoint's (the optimizer and scheduler
    state restored by the Trainer keep the checkpoint's base learning rates)."""
    from qwenvl.runpolicy import schedule_changes

    old = recorded.get("schedule") if recorded else _old_schedule(checkpoint)
    changes = schedule_changes(old, _schedule(training_args))
    if not changes or training_args.process_index != 0:
        return
    base = [c for c in changes if c[0] in ("learning_rate", "mm_projector_lr", "vision_tower_lr")]
    shape = [c for c in changes if c not in base]
    parts = []
    if base:
        parts.append(", ".join(f"{k} {v!s} (checkpoint: {o!s})" for k, o, v in base)
                     + " not applied: the checkpoint's optimizer and scheduler state keep its base learning rate")
    if shape:
        parts.append(", ".join(f"{k} {v!s} (checkpoint: {o!s})" for k, o, v in shape)
                     + " applied from the next step on, on the checkpoint's base learning rate and step count")
    logger.warning("resume from %s: %s; to train with other learning-rate settings start a new run from its "
                   "weights (model.name_or_path=%s, a new output.dir)", checkpoint, "; ".join(parts), checkpoint)


def _resume_point(training_args, settings=None) -> tuple[str | None, tuple[str, dict] | None]:
    """The checkpoint to continue from (None: a fresh start; old checkpoints set aside with overwrite), or one line
    when ``output_dir`` holds a run that this start would silently replace (:func:`qwenvl.runpolicy.decide_resume`)
    or the checkpoint was written with other settings (its ``vlsft-run.json``), and ``(checkpoint, its record)``
    (None without a record)."""
    resume = training_args.resume
    rfc = str(training_args.resume_from_checkpoint or "").strip()
    if rfc and resume == "auto":  # the HF flag: PATH, or True/False as some scripts pass it
        resume = {"true": "auto", "yes": "auto", "1": "auto", "false": "never", "no": "never", "0": "never",
                  "none": "auto"}.get(rfc.lower(), rfc)
    resume_from = decide_resume(training_args.output_dir, resume, training_args.overwrite_output_dir,
                                warn=logger.warning if training_args.process_index == 0 else (lambda _msg: None))
    check_resumable(resume_from, training_args.deepspeed)
    found = None
    if resume_from:
        from qwenvl.runpolicy import read_run_record

        record = read_run_record(resume_from)
        found = (resume_from, record) if record else None
        if settings is not None:  # this run's settings (a function: only computed when resuming)
            _check_settings(found, settings())
        _warn_schedule(resume_from, record, training_args)
        logger.info("resuming from %s", resume_from)
        from qwenvl.reshard import prepare_resume

        resume_from = prepare_resume(resume_from, training_args)  # another world size: a universal conversion
    elif training_args.overwrite_output_dir and training_args.process_index == 0:
        set_aside_old_checkpoints(training_args.output_dir)
    return resume_from, found


def _checked_family(model_args, data_args, training_args):
    """The model folder's :class:`~qwenvl.families.Family`, refused in one line when it cannot run with these
    batching / DeepSpeed settings here (the front door checks the same rules)."""
    from qwenvl.families import family_at
    from qwenvl.prechecks import zero_stage

    fam = family_at(model_args.model_name_or_path)
    found = (fam.batching_problem(data_flatten=data_args.data_flatten, data_packing=data_args.data_packing)
             or fam.deepspeed_problem(zero_stage(training_args.deepspeed) if training_args.deepspeed else None))
    if found:
        raise UserError(found)
    return fam


# ---- load the model and its processor
def _load_model_and_processor(model_args, data_args, training_args, fam, lora_plan):
    """The processor (pixel limits from the data arguments: saved with the model, used at inference) and the model
    in the run's dtype (QLoRA: quantised), without a generation cache; an unloadable kernel is one line."""
    import torch

    from qwenvl.model import ModelTypeError, load_model, load_processor

    processor = load_processor(model_args.model_name_or_path, fam.model_type)
    if getattr(processor.image_processor, "size", None) is not None:
        processor.image_processor.size = {"shortest_edge": data_args.min_pixels, "longest_edge": data_args.max_pixels}

    dtype = torch.bfloat16 if training_args.wants_bf16 else (torch.float16 if training_args.fp16 else torch.float32)
    extra_load: dict = {}
    if lora_plan is not None and training_args.lora_quantize:
        from qwenvl.lora import quantization_kwargs

        extra_load = quantization_kwargs(training_args.lora_quantize, dtype)
    try:
        model = load_model(model_args.model_name_or_path, dtype=dtype,
                           attn_implementation=model_args.attn_implementation or "sdpa", **extra_load)
    except (ImportError, ValueError) as e:  # e.g. flash_attention_2 without flash-attn, an unknown kernel name
        if isinstance(e, ModelTypeError):
            raise
        raise UserError(f"cannot load the model {model_args.model_name_or_path} (attn_implementation "
                        f"{model_args.attn_implementation or 'sdpa'}): {str(e).strip().splitlines()[0]}") from e
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    return model, processor


# ---- the training mode: freezing, LoRA, the speed path
def _apply_training_mode(model, model_args, training_args, lora_plan, model_type: str):
    """Freeze what ``--tune_mm_*`` (or the LoRA plan's fully trained parts) leaves out, add the LoRA adapters,
    and prepare the vision tower's fast path; logs what trains. Returns the model (PEFT-wrapped with LoRA)."""
    from qwenvl.attention import prepare_for_training
    from qwenvl.model import apply_freezing, trainable_counts
    from qwenvl.prechecks import NOTHING_TO_TRAIN

    full = set(lora_plan.full) if lora_plan is not None else None
    counts = apply_freezing(
        model, tune_mm_vision=model_args.tune_mm_vision if full is None else "vision" in full,
        tune_mm_mlp=model_args.tune_mm_mlp if full is None else "merger" in full,
        tune_mm_llm=model_args.tune_mm_llm if full is None else "llm" in full)
    if training_args.uses_activation_checkpointing:
        # the embeddings' output must require grad for reentrant checkpointing when the embeddings are frozen;
        # (the Trainer enables checkpointing itself, non-reentrant unless activation_checkpointing_kwargs says so)
        model.enable_input_require_grads()
    if lora_plan is not None:
        model = _add_lora(model, lora_plan, training_args)
        counts = trainable_counts(model)
    speed = prepare_for_training(model)  # vision attention in one call per layer; frozen blocks forward-only
    logger.info("trainable parameters: %s (model_type %s, %s)",
                ", ".join(f"{k} {v:,}" for k, v in counts.items()), model_type, type(model).__name__)
    logger.info("speed: vision attention one call per layer %s, forward-only frozen vision blocks %d",
                speed["vision_attention"], speed["forward_only_vision_blocks"])
    if not any(counts.values()):
        raise UserError(NOTHING_TO_TRAIN)
    return model


def _add_lora(model, lora_plan, training_args):
    from qwenvl import lora

    if training_args.lora_quantize:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.uses_activation_checkpointing)
    return lora.apply_lora(model, lora_plan, r=training_args.lora_r, alpha=training_args.lora_alpha,
                           dropout=training_args.lora_dropout, use_rslora=training_args.lora_use_rslora,
                           use_dora=training_args.lora_use_dora)


def _crash_if_a_test_asks(rank: int) -> None:
    """Test hook: ``VLSFT_TEST_CRASH_RANK=R`` makes rank R exit with status 3 here (one dead rank ends the job)."""
    crash = os.environ.get("VLSFT_TEST_CRASH_RANK")
    if crash is not None and int(crash) == rank:
        logger.error("VLSFT_TEST_CRASH_RANK=%s: rank %d exits with status 3 (test hook)", crash, rank)
        os._exit(3)


# ---- the data
def _load_data(processor, data_args, training_args, model_type: str, eval_strategy: str):
    """The data module (:func:`qwenvl.data.dataset.make_data_module`) and the eval dataset (None: no evaluation);
    the held-out records are listed in ``<output_dir>/logs/eval-split.json``."""
    from qwenvl.data.dataset import make_data_module

    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    data = make_data_module(processor.tokenizer, processor.image_processor, data_args, seed=seed,
                            model_type=model_type)
    report = data.get("report")
    if report is not None and training_args.process_index == 0:
        logger.info("data: %s", report if isinstance(report, str) else json.dumps(report, default=str)[:2000])

    _check_dataset_size(len(data["train_dataset"]), training_args)
    eval_dataset = data.get("eval_dataset") if eval_strategy != "no" else None
    if eval_strategy != "no" and eval_dataset is None:
        raise UserError("the eval selection (eval_split / eval_dataset_use) has no samples: raise eval_split or "
                        "name eval datasets with records")
    if data.get("held_out") and training_args.should_save:  # which records were held out (never trained on)
        logs_dir = Path(training_args.output_dir) / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        (logs_dir / "eval-split.json").write_text(json.dumps(
            {"eval_split": data_args.eval_split, "seed": report.seed if hasattr(report, "seed") else None,
             "held_out": data["held_out"]}, indent=1), encoding="utf-8")
    return data, eval_dataset


def _check_dataset_size(n: int, training_args) -> None:
    """At least one batch per rank (transformers would fail with an unrelated message about max_steps)."""
    world = max(training_args.world_size, 1)
    if n == 0:
        raise UserError("the dataset selection has no samples: check dataset_use and the annotation files")
    if training_args.dataloader_drop_last and -(-n // world) < training_args.per_device_train_batch_size:
        raise UserError(f"the dataset has {n} samples, fewer than one batch on every rank "
                        f"({training_args.per_device_train_batch_size} x {training_args.world_size} ranks) with "
                        "dataloader_drop_last: lower per_device_train_batch_size or add data")


# ---- the trainer
def _build_trainer(model, processor, data, eval_dataset, model_args, training_args, lora_plan, resume_from):
    """The :class:`~qwenvl.trainer.QwenVLTrainer` with its callbacks (W&B run config, stop on a signal, LoRA
    extras); returns it and the LoRA saver (None without LoRA)."""
    from qwenvl import stopsignal
    from qwenvl.trainer import ExtraRunConfigCallback, QwenVLTrainer

    report = data.get("report")
    cfg = model.config
    trainer = QwenVLTrainer(
        model=model, args=training_args, train_dataset=data["train_dataset"], eval_dataset=eval_dataset,
        dataset_names=data.get("dataset_names"),
        data_collator=data["data_collator"], processing_class=processor,
        image_token_id=getattr(cfg, "image_token_id", None), video_token_id=getattr(cfg, "video_token_id", None),
        data_report=report if isinstance(report, dict) else None,
        bad_sample_monitor=data.get("bad_sample_monitor"),
    )
    report_to = training_args.report_to or []
    if "wandb" in report_to:
        trainer.add_callback(ExtraRunConfigCallback(_load_run_config(training_args.output_dir),
                                                    report if isinstance(report, dict) else None))

    trainer.add_callback(stopsignal.make_callback())  # SIGINT/SIGTERM/SIGHUP: checkpoint, then stop
    trainer.add_callback(_phase_callback())  # the lost-peer line names the step a hang or a dead rank stopped
    save_lora = None
    if lora_plan is not None:
        from qwenvl import lora

        save_lora = _lora_saver(model, lora_plan, model_args, training_args)
        trainer.add_callback(lora.SaveExtrasCallback(save_lora))
        if resume_from and not training_args.deepspeed:  # DeepSpeed restores every module weight from its state
            try:
                lora.load_full_parts(model, resume_from)
            except (ValueError, RuntimeError, KeyError) as e:
                if isinstance(e, UserError):
                    raise
                from qwenvl.runpolicy import load_failure_message

                raise UserError(load_failure_message(resume_from, e)) from e
    return trainer, save_lora


def _load_run_config(output_dir: str) -> dict | None:
    p = Path(output_dir) / "vlsft" / "run.yaml"
    if not p.is_file():
        return None
    try:
        import yaml

        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - extra W&B context only
        return None


def _lora_saver(model, plan, model_args, training_args):
    from qwenvl import lora

    settings = {"r": training_args.lora_r, "alpha": training_args.lora_alpha, "dropout": training_args.lora_dropout,
                "use_rslora": training_args.lora_use_rslora, "use_dora": training_args.lora_use_dora,
                "quantize": training_args.lora_quantize}

    def save(folder: str) -> None:
        lora.save_lora_extras(model, folder, should_save=training_args.should_save, plan=plan,
                              base_model=os.path.abspath(model_args.model_name_or_path), settings=settings)
    return save


# ---- train and save
def _train_and_save(trainer, processor, training_args, resume_from, save_lora) -> str:
    """Train, then save the final model, tokenizer, processor and chat template (LoRA: adapter, trained parts and
    manifest); returns the run's summary line. A stop by signal ends here with its checkpoint and no final model."""
    from qwenvl import stopsignal

    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except (ValueError, RuntimeError, KeyError) as e:
        # a checkpoint whose state does not fit this model or optimizer (written with other settings by an older
        # vlsft, without a vlsft-run.json to compare before loading): one line, not a traceback per rank
        from qwenvl.runpolicy import is_no_space, load_failure_message

        if not getattr(trainer, "loading_checkpoint", False) or isinstance(e, UserError) or lost_peer(e) \
                or is_no_space(e):
            raise
        raise UserError(load_failure_message(resume_from, e)) from e
    if stopsignal.received() is not None:  # stopped by a signal: the checkpoint is saved, there is no final model
        raise stopsignal.Stopped(stopsignal.received())
    # every rank: totals over ranks; no sample trained / past the bad-sample limit -> one error line, no final model
    summary = trainer.finish_run()
    trainer.save_state()
    trainer.save_model(training_args.output_dir)  # gathers ZeRO-3 shards; writes processor + chat template too
    if save_lora is not None:  # LoRA: the adapter is saved (PEFT layout); now the fully-trained parts + manifest
        save_lora(training_args.output_dir)
    if training_args.should_save:
        processor.save_pretrained(training_args.output_dir)
        logger.info("final model, tokenizer, processor and chat template saved in %s", training_args.output_dir)
    return summary


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` prints every thread's stack (diagnosing a stuck rank)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        try:
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        except (OSError, ValueError, AttributeError):  # stderr without a file descriptor (embedded use, tests)
            pass


def _teardown() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            _EXIT["had_group"] = True
            dist.barrier()
            dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001
        logger.warning("process-group teardown: %s", e)


def _take_output_lock(argv: list[str]):
    """Rank 0 of a run started without ``vlsft train`` takes the output lock (vlsft already holds it for its
    ranks: :data:`LOCK_ENV`); None when not ours to take."""
    out = _argv_value(argv, "--output_dir")
    if not out or int(os.environ.get("RANK", "0")) != 0 or "--help" in argv or "-h" in argv:
        return None
    if Path(out).exists() and not Path(out).is_dir():
        return None  # run() reports it in one line
    from qwenvl.prechecks import same_folder

    if same_folder(out, os.path.expanduser(_argv_value(argv, "--model_name_or_path") or "")):
        return None  # the model folder: run() refuses it in one line, nothing is written there
    lock = OutputLock(out, command=" ".join([sys.executable, "-m", "qwenvl.train", *argv]))
    if os.environ.get(LOCK_ENV) == str(lock.path):
        return None
    lock.acquire()
    for w in lock.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return lock


def _report(e: Exception) -> None:
    """One ``error:`` line per problem, on rank 0 (or on the rank that found it, for mid-training errors)."""
    rank = int(os.environ.get("RANK", "0"))
    if isinstance(e, UserError):
        lines = e.lines()
        if e.every_rank:
            lines = [f"error: [rank {rank}] {x[len('error: '):] if x.startswith('error: ') else x}" for x in lines]
        elif rank != 0:
            return
    elif rank == 0:
        lines = [f"error: {str(e).strip().splitlines()[0]}"]
    else:
        return
    for line in lines:
        _print_error(line)


def _print_error(line: str) -> None:
    """One error line on stderr, on a line of its own even when a progress bar is drawing there (tqdm redraws
    with a carriage return and no newline, which would glue the line to the bar in logs)."""
    try:
        from tqdm import tqdm

        bar_active = bool(getattr(tqdm, "_instances", None))
    except ImportError:
        bar_active = False
    print(("\n" if bar_active else "") + line, file=sys.stderr, flush=True)


#: what a collective raises on a surviving rank when another rank died or hangs past the collective timeout
#: (``ddp_timeout``; gloo / NCCL / the c10d store)
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "remote process exited", "Socket Timeout", "ProcessGroup abort",
              "collective operation timeout", "Timed out", "timed out")
#: what this rank is doing (the lost-peer line names it): set by run()'s steps, "training" then per step
PHASE = {"now": "starting"}  # "... stopped or hung while <PHASE>"


def _phase_callback():
    from transformers import TrainerCallback

    class PhaseCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            PHASE["now"] = f"in training step {state.global_step + 1}"

        def on_save(self, args, state, control, **kwargs):
            PHASE["now"] = f"after saving checkpoint-{state.global_step}"

    return PhaseCallback()


def lost_peer(e: BaseException) -> str | None:
    """A short reason when ``e`` is a collective failing because another rank is gone, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    dist_errors = tuple(t for t in (getattr(dist, "DistError", None),) if t is not None)
    text = str(e)
    if not (isinstance(e, dist_errors) or (isinstance(e, RuntimeError) and ("gloo" in text or "NCCL" in text
                                                                            or "c10d" in text))):
        return None
    for marker in _PEER_LOST:
        if marker in text:
            return marker.lower()
    return None


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 for input errors (one ``error:`` line, no traceback), 128 + N when stopped by
    signal N (SIGINT 130, SIGTERM 143, SIGHUP 129; a checkpoint is saved first once training has begun)."""
    from qwenvl import stopsignal

    argv = list(sys.argv[1:] if argv is None else argv)
    _dump_stacks_on_sigusr1()
    if __name__ == "__main__":  # a process of its own (not main() called by a test or a script)
        stopsignal.install()
        stopsignal.stop_with_launcher()
    lock = None
    try:
        lock = _take_output_lock(argv)
        rc = run(argv)
    except stopsignal.Stopped as e:
        return 128 + e.signum
    except UserError as e:
        _report(e)
        return 2
    except ImportError as e:
        if "pip install" not in str(e):  # an optional package a flag needs names its install command
            raise
        _report(e)
        return 2
    except Exception as e:  # noqa: BLE001 - a lost peer or a full disk; anything else keeps its traceback
        from qwenvl.runpolicy import is_no_space, no_space_message

        if is_no_space(e):
            out = _argv_value(argv, "--output_dir") or "."
            _print_error(f"error: [rank {os.environ.get('RANK', '0')}] {no_space_message(out)}")
            return 2
        why = lost_peer(e)
        if why is None:
            raise
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one line per node; the launcher names the rank that died
            import socket

            _print_error(f"error: [rank {os.environ.get('RANK', '0')}, node {socket.gethostname()}] another rank "
                         f"stopped or hung while {PHASE['now']} ({why}): this rank stops too; the cause is the "
                         "failing rank's own message or the launcher's last line")
        return 1
    finally:
        if lock is not None:
            lock.release()
    _teardown()
    return rc


_EXIT = {"had_group": False}


def _exit_now(rc: int) -> None:
    """End a rank that had a process group without running C++ destructors.

    A failed rank: a process group left alive on an error path (a barrier there could hang when the other ranks
    are elsewhere) otherwise aborts now and then at interpreter exit ("terminate called without an active
    exception", status 134), which would hide the error's own status. A finished rank: even after
    ``destroy_process_group()`` the collective library's threads can still hold work objects whose destruction
    during interpreter finalization aborts the same way (seen now and then in two-rank runs on a loaded machine),
    turning a run that saved everything into "training exited with status 134"; so once the group is destroyed a
    rank joins its threads and runs the exit handlers as a normal exit would, flushes, and leaves with
    ``os._exit``."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    alive = dist.is_available() and dist.is_initialized()
    if not alive and not _EXIT["had_group"]:
        return
    if not alive:  # the group is gone: nothing left to hang on, so the exit handlers run as they would
        import atexit
        import threading

        for t in threading.enumerate():  # what the interpreter's own shutdown does first: non-daemon threads end
            if t is not threading.current_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()  # W&B, logging, multiprocessing: every handler a normal exit would run
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    code = main()
    _exit_now(code)
    sys.exit(code)

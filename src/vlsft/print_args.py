"""``vlsft print-args`` without Typer: the plan's rendering and the command's work (torch-, typer-free).

:mod:`vlsft.cmd_plan` registers the Typer command on top of :func:`run`; :func:`fast_main` runs the plain command
lines (``--config`` and its options, KEY=VALUE overrides) without importing Typer at all (its import and its
per-option pydantic adapters are a tenth of the command's time), and hands anything else (``--help``, an unknown
option, a missing ``--config``, a folder as the config) to Typer, which then answers exactly as it always does.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from pathlib import Path

from qwenvl.secrets import mask_url, mask_urls

OVERRIDES_HELP = "Dotted overrides applied on top of the YAML, typed like YAML: training.learning_rate=2e-5"


def group_argv(argv: list[str]) -> list[list[str]]:
    """Split argv into lines: the program, then each option with its value(s)."""
    lines: list[list[str]] = [[argv[0]]] if argv else []
    for token in argv[1:]:
        if token.startswith("-") and not _is_number(token):
            lines.append([token])
        else:
            lines[-1].append(token)
    return lines


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def format_command(argv: list[str]) -> str:
    """A copy-pasteable shell command: one option per line with ``\\`` continuations."""
    lines = [" ".join(shlex.quote(t) for t in group) for group in group_argv(argv)]
    return " \\\n  ".join(lines)


def _env_lines(env: dict[str, str], is_secret) -> list[str]:
    out = []
    for key, value in env.items():
        if is_secret(key, value):
            out.append(f"# {key}=***  (secret, masked; vlsft train passes the real value)")
        else:
            out.append(f"export {key}={shlex.quote(mask_url(value))}")
    return out


def _model_lines(plan) -> list[str]:
    """The hub id and what the HF cache holds of it; the family (config.json's model_type, or the id's name before
    a download) and what it cannot do here (qwenvl.families.Family.limits)."""
    parts = []
    hub = plan.hub
    if hub is not None:
        parts.append(f"# Model: hub id {hub.repo_id}, revision {hub.revision}: {hub.state()} ({hub.cache}); "
                     f"{hub.source()}")
    if plan.family:
        from qwenvl.families import family
        from qwenvl.templates import RENDERINGS

        fam = family(plan.family)
        limits = "; cannot here: " + "; ".join(plan.family_limits) if plan.family_limits else ""
        built = "the official HEAD layout" if fam.head else "the official Qwen2.5-era layout"
        if RENDERINGS[fam.chat_template].thinking:  # the Qwen3.5 line: its own chat template, HEAD's media
            built = "the chat template below, media as the official HEAD layout"
        source = (f"family read from the id, not from a config.json: {hub.repo_id} reads as {fam.title}; `vlsft "
                  "train` checks the downloaded config.json" if plan.family_from_id else
                  f"config.json model_type {fam.model_type}")
        parts.append(f"# Model family: {fam.title} ({source}; samples built as {built}, boxes {fam.grounding}){limits}")
    return parts + [""] if parts else []


def render_text(plan, config_path: str, overrides: list[str] | None = None,
                gpu: str | None = None) -> str:  # plan: vlsft.plan.LaunchPlan
    cfg = plan.config
    tr = cfg.training
    train = " ".join(shlex.quote(t) for t in ["vlsft", "train", "--config", config_path, *(overrides or [])])
    parts = [f"# Launch plan for {config_path} (nothing started; `{train}` runs it)", ""]
    parts.append("# Environment set for every rank:")
    parts += _env_lines(plan.env, plan.is_secret) or ["# (none)"]
    if plan.slurm:
        parts += ["", f"# From {plan.cluster or 'SLURM'}: {' '.join(plan.slurm)}"]
    parts += ["", "# Command:", format_command(plan.torchrun), ""]
    parts += _model_lines(plan)
    if plan.chat:  # qwenvl.templates.resolve / describe: the template and, per dataset, thinking and effort
        from qwenvl.templates import RENDERINGS

        r = RENDERINGS[plan.chat["template"]]
        if r.thinking:  # the Qwen2.5-VL / Qwen3-VL layouts are named on the family line
            parts.append(f"# Chat template: {r.title}, samples rendered as it renders them ({plan.chat['why']})")
    parts.append(f"# Datasets (--dataset_use {plan.dataset_use}):")
    width = max((len(s.name) for s in [*plan.datasets, *plan.eval_datasets]), default=4)
    chat = plan.chat.get("datasets", {})
    for s in plan.datasets:
        parts.append(f"#   {s.name:<{width}}  {s.records:>10,} records x {s.percent:g} % = {s.samples:,} samples")
        if s.name in plan.dataset_notes:
            parts.append(f"#   {'':<{width}}  note: {plan.dataset_notes[s.name]}")
        if s.name in chat:
            parts.append(f"#   {'':<{width}}  chat: {chat[s.name]}")
    parts.append(f"samples per epoch = {plan.samples_per_epoch:,}")
    if plan.eval_datasets:
        parts.append("# Eval datasets (never trained on when held out):")
        for s in plan.eval_datasets:
            parts.append(f"#   {s.name:<{width}}  {s.records:>10,} records x {s.percent:g} % = {s.samples:,} samples")
        parts.append(f"eval samples = {plan.eval_samples:,}, evaluated {plan.eval_every or 'never (eval_strategy no)'}")
    parts.append(f"{plan.batch_formula}  (per-device x accumulation x nproc_per_node x nnodes)")
    from qwenvl.data.token_budget import budget_lines  # tokens per step with packing (torch-free)

    d, per_device = cfg.data, tr.per_device_train_batch_size
    parts += budget_lines(packing=d.packing, packing_rows=d.packing_rows, model_max_length=d.model_max_length,
                          per_device=per_device, world=plan.world_size,
                          accumulation=plan.effective_batch_size // max(per_device * plan.world_size, 1))
    estimate = " (estimate: packing puts several samples in a row)" if plan.steps_are_estimate else ""
    parts.append(f"steps per epoch = ceil({plan.samples_per_epoch} / {plan.effective_batch_size}) = "
                 f"{plan.steps_per_epoch}{estimate}")
    if plan.trainable is not None:
        from qwenvl.lora_rules import format_report

        lora = cfg.model.lora
        how = (f"LoRA r={lora.r} alpha={lora.alpha} on {lora.target_modules or lora.targets or 'llm'}"
               if lora.enabled else "full fine-tuning")
        parts.append(f"# Trainable parameters ({how}):")
        parts += format_report(plan.trainable)
    if plan.memory is not None:
        parts += ["# " + line for line in plan.memory.lines()]
    elif plan.hub is not None and not plan.hub.complete:
        parts.append(f"# Trainable parameters and GPU memory per rank: unknown until downloaded (no weights of "
                     f"{plan.hub.repo_id} in the cache yet)")
    if gpu:
        parts.append(time_line(plan, gpu)[0])
    if tr.max_steps > 0:
        parts.append(f"total steps = {plan.total_steps} (training.max_steps)")
    else:
        epochs = tr.num_train_epochs
        parts.append(f"total steps = ceil({epochs:g} x {plan.steps_per_epoch}) = {plan.total_steps}"
                     + ("" if math.isclose(epochs, round(epochs)) else " (fractional epochs)"))
    return mask_urls("\n".join(parts))  # no URL credentials (an endpoint's user:password@) in the plan



def run(config: Path, overrides: list[str] | None, as_json: bool, gpu_memory: str | None, gpu: str | None) -> None:
    """The command: plan the run YAML and print it (text or ``--json``); a UserError is one line each, exit 2."""
    from qwenvl.problems import UserError
    from qwenvl.safe_write import name_problem
    from vlsft.config import load_run_config
    from vlsft.plan import build_plan

    try:
        cfg = load_run_config(config, list(overrides or []))
        why = "://" not in cfg.output.dir and name_problem(cfg.output.dir, "output.dir")
        if why:  # OSError 36 (File name too long) as one line, before the plan looks at the folder
            raise UserError(why)
        plan = build_plan(cfg)
        memory_check(plan, gpu_memory)
    except UserError as exc:
        from vlsft.render import fail

        fail(exc)
    if as_json:
        sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n")
        return
    _echo(render_text(plan, str(config), list(overrides or []), gpu=gpu))
    for warning in plan.warnings:
        _echo(f"warning: {warning}", "\x1b[33m")


def _echo(text: str, color: str | None = None) -> None:
    """``typer.echo`` / ``typer.secho(fg=...)``: one line on stdout, the color only on a terminal."""
    if color and sys.stdout.isatty():
        text = f"{color}{text}\x1b[0m"
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


#: print-args' options that take a value (long and short names) and its flag
_VALUE_OPTIONS = {"--config": "config", "-c": "config", "--gpu-memory": "gpu_memory", "--gpu": "gpu"}


def parse_fast(args: list[str]) -> dict | None:
    """The arguments of ``print-args`` (after the word) as :func:`run`'s keywords, when they are plainly the
    command's own (each option once, values that are not options, ``--config`` a path that is not a folder);
    None otherwise: Typer parses them (help, usage errors, everything else)."""
    got: dict = {"overrides": []}
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if token == "--json":
            if "as_json" in got:
                return None
            got["as_json"] = True
        elif name in _VALUE_OPTIONS and (eq or token == name):
            key = _VALUE_OPTIONS[name]
            if not eq:
                i += 1
                if i == len(args):
                    return None
                value = args[i]
            if key in got or not value or value.startswith("-"):
                return None
            got[key] = value
        elif token.startswith("-") or not token:
            return None
        else:
            got["overrides"].append(token)
        i += 1
    if "config" not in got or os.path.isdir(got["config"]):
        return None
    got["config"] = Path(got["config"])
    return {"as_json": False, "gpu_memory": None, "gpu": None, **got}


def fast_main(args: list[str]) -> bool:
    """Run ``print-args`` with ``args`` (after the word) without Typer when :func:`parse_fast` reads them; False
    (nothing done) when Typer must. Exits as Typer's command would (0, or the code of ``render.fail``)."""
    kwargs = parse_fast(args)
    if kwargs is None:
        return False
    try:
        run(**kwargs)
    except Exception as exc:
        code = getattr(exc, "exit_code", None)  # typer.Exit from render.fail (Typer exits with its code)
        if code is None or type(exc).__name__ != "Exit":
            raise
        raise SystemExit(code) from None
    return True


def memory_check(plan, gpu_memory: str | None) -> None:
    """Refuse (one line) a plan whose memory estimate does not fit ``gpu_memory`` (``80GiB``; None: no check)."""
    if not gpu_memory:
        return
    from qwenvl import memory
    from qwenvl.problems import UserError

    try:
        size = memory.parse_size(gpu_memory)
    except ValueError:
        raise UserError(f"--gpu-memory {gpu_memory!r} is not a size: write e.g. 80GiB, 141GB or 81920MiB") from None
    if plan.memory is None:
        return
    why = memory.refusal(plan.memory, size)
    if why:
        raise UserError(why)


def time_line(plan, gpu: str | None) -> tuple[str, float | None]:
    """``(the "time per epoch" line, the planned tokens/s per GPU or None)`` (:mod:`qwenvl.timing`)."""
    import json as _json

    from qwenvl import timing

    cfg = plan.config
    d = cfg.data
    factor = 28
    try:
        with open(os.path.join(cfg.model.name_or_path, "config.json"), encoding="utf-8") as f:
            vision = _json.load(f).get("vision_config") or {}
        factor = int(vision.get("patch_size") or 14) * int(vision.get("spatial_merge_size") or 2)
        from qwenvl.lora_rules import weight_shapes

        n_llm = timing.llm_matmul_params(weight_shapes(cfg.model.name_or_path))
    except (OSError, ValueError, TypeError):
        n_llm = 0
    image = max(1, d.max_pixels // factor**2)
    video = max(1, (d.video_max_pixels or d.video_max_frame_pixels * max(d.video_max_frames // 2, 1)) // factor**2)
    total = 0.0
    for share in plan.datasets:
        mean = timing.mean_sample_tokens(plan.annotation_paths.get(share.name, ""), image_tokens=image,
                                         video_tokens=video)
        total += share.samples * (mean or 0.0)
    rate, source = timing.tokens_per_second(gpu, n_llm, bool(cfg.model.tune_mm_llm or cfg.model.lora.enabled))
    return timing.epoch_line(total, plan.world_size, rate, source), rate

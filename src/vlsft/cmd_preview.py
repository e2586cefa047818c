"""``vlsft datasets preview``: exactly what the model sees for one sample.

    vlsft datasets preview --config run.yaml --dataset NAME --index 0
    vlsft datasets preview --config run.yaml --dataset NAME --index 0 --json
    vlsft datasets preview --config run.yaml --dataset NAME --index 0 data.max_pixels=50176
    vlsft datasets preview --model ./tiny --dictionary Dataset-Dictionary.json --dataset NAME --index 3
    vlsft datasets preview --config run.yaml --dataset NAME --index 0 --draw seen.png

The sample goes through the trainer's own code (``qwenvl.data.dataset.make_builder``: the run's
tokenizer and image processor from ``model.name_or_path``, the run's ``data.*`` pixel/frame
settings and ``model_max_length``). The text is printed with runs of vision pads collapsed
(``<|image_pad|>×64``) and trained tokens highlighted, followed by grids and token counts.
``--json`` prints ``input_ids``, ``labels``, ``position_ids`` (3 x L), grids, ``second_per_grid_ts``
and statistics of ``pixel_values`` / ``pixel_values_videos`` (``shape``, ``sum``, ``sum_sq``,
``abs_sum``; null when absent). Grounding ``objects`` (:mod:`qwenvl.data.grounding`) are shown rendered in the
family's convention (text, one line per object; ``--json``: ``objects``, ``image_sizes``); ``--draw FILE.png``
writes the image(s) as the model sees them, resized, with the boxes drawn from those coordinates (a new file:
an existing one is refused). Exit 1 for a bad sample (with its reason; a record whose line is not JSON too), 2 for
usage errors: a model folder that does not exist, is not a folder, or whose tokenizer or processor settings
cannot be read. Only the named dataset's dictionary entry must be readable: the errors of other entries (a
LLaMA-Factory catalogue's alpaca or ranking datasets) are one warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from qwenvl.problems import Problem, ProblemsError, UserError, did_you_mean
from vlsft import render
from vlsft.app import datasets_app
from vlsft.keymap import owned_by, yaml_value


def _fail(message: str, *, file: str | None = None, hint: str | None = None, code: int = 2) -> None:
    if file is None:  # an option's problem: ``error: message (hint: ...)``, no place
        render.fail(UserError(message + (f" (hint: {hint})" if hint else "")), code=code)  # (URLs masked)
    render.fail(Problem("error", message, file=file, hint=hint), code=code)


def _resolve(base: Path | None, p: str) -> str:
    if "://" in p or os.path.isabs(p) or base is None:
        return p
    return str((base / p).resolve())


def _stats(t) -> dict | None:
    if t is None:
        return None
    import torch

    a = t.to(torch.float64)
    return {"shape": list(t.shape), "sum": float(a.sum()), "sum_sq": float((a * a).sum()),
            "abs_sum": float(a.abs().sum())}


def _render_text(console, tokenizer, ids: list[int], labels: list[int], pads: dict[int, str]) -> None:
    from rich.text import Text

    text = Text()
    i, n = 0, len(ids)
    while i < n:
        if ids[i] in pads:
            j = i
            while j < n and ids[j] == ids[i]:
                j += 1
            text.append(f"{pads[ids[i]]}×{j - i}", style="magenta")
            i = j
            continue
        trained = labels[i] != -100
        j = i
        while j < n and ids[j] not in pads and (labels[j] != -100) == trained:
            j += 1
        text.append(tokenizer.decode(ids[i:j]), style="bold green" if trained else "dim")
        i = j
    console.print(text)


def _conversation(record, fmt, default_system: str | None) -> list[dict]:
    """The normalised conversation the tokens are built from (the system turn first, when there is one)."""
    from qwenvl.data import formats, sample_rules

    internal, extras, _ = formats.sample_problems(record, fmt)
    system = extras.system if extras.system is not None else (fmt.system if fmt.system is not None else default_system)
    turns = [{"role": "system", "content": system, "trained": False}] if system is not None else []
    for role, content, train in sample_rules.turn_triples(internal["conversations"], extras.untrained):
        turns.append({"role": role, "content": content, "trained": train and role == "assistant"})
    return turns


def _given(obj: dict) -> list:
    return obj.get("given", [])


def _grounding(record, fmt, data_path, builder, sample, conversation) -> tuple[list[dict], list, list]:
    """The sample's objects in the family's convention (rendered into ``conversation`` in place), each image's
    (original, resized) size and the opened images (:mod:`qwenvl.data.grounding`)."""
    from qwenvl import storage
    from qwenvl.data import formats, grounding, sample_rules, vision

    internal = formats.sample_problems(record, fmt)[0]
    img = internal.get("image")
    paths = [] if img is None else [img] if isinstance(img, str) else list(img)
    if not paths:
        return [], [], []
    pil = [vision.open_image(storage.join(data_path, p), exif=builder.head) for p in paths]
    grids = sample["image_grid_thw"].tolist()
    objects, sizes = grounding.preview_objects(internal, pil, grids, builder.spec.patch_size, fmt.bbox_format,
                                               builder.model_type)
    for obj, src in zip(objects, grounding.as_objects(internal.get("objects")), strict=True):
        obj["given"] = src.get("bbox") if src.get("bbox") is not None else src.get("point")
        if "bbox_format" in src:  # ms-swift's bbox_type, the object's own
            obj["bbox_format"] = src["bbox_format"]
    if objects or objects.refs:  # (ms-swift's refs are rendered without boxes too)
        lead = len(conversation) - len(sample_rules.turn_triples(internal["conversations"]))  # the added system turn
        texts = grounding.render_texts([t["content"] for t in conversation[lead:]], objects,
                                       builder.family.grounding)
        for t, text in zip(conversation[lead:], texts, strict=True):
            t["content"] = text
    return objects, sizes, pil


@datasets_app.command("preview")
def preview(
    dataset: str = typer.Option(..., "--dataset", help="Dataset name in the dictionary."),
    index: int = typer.Option(0, "--index", help="Record index in the dataset's annotation file (0-based)."),
    config: Path | None = typer.Option(None, "--config", help="Run YAML (model, data.dictionary, data.* settings)."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", show_default=False,
                                          help="Run YAML overrides, as for print-args: data.max_pixels=50176."),
    model: str | None = typer.Option(None, "--model", help="Model/tokenizer directory (instead of --config)."),
    dictionary: str | None = typer.Option(None, "--dictionary", help="Dataset dictionary JSON (instead of --config)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    draw: Path | None = typer.Option(None, "--draw", help="Write a PNG of the image(s) as the model sees them "
                                     "(resized) with the grounding boxes drawn (a new file; never overwritten)."),
) -> None:
    """Show exactly what the model sees for one sample (tokens, trained spans, grids, pixel statistics)."""
    if draw is not None:
        _check_draw_target(draw)
    given = "--model" if model else "model.name_or_path"
    model, dictionary, data_args = _sources(config, overrides, model, dictionary)
    spec, store = _annotations(dictionary, dataset, index)
    _check_model(model, given)
    tokenizer, builder = _builder(model, data_args)
    where = store.where(index)
    from qwenvl.data import formats

    fmt = formats.settle(spec.format_spec, formats.store_head(store))  # as the trainer settles it (registry)
    _record_or_fail(store, index, where, fmt, as_json)  # a line that is not JSON: a bad sample (one line, exit 1)
    sample = _build_or_fail(builder, store[index], spec.data_path, fmt, where, as_json)
    from qwenvl.data.preprocess import SYSTEM_MESSAGE

    conversation = _conversation(store[index], fmt, None if getattr(builder, "head", False) else SYSTEM_MESSAGE)
    objects, sizes, pil = _grounding(store[index], fmt, spec.data_path, builder, sample, conversation)
    if draw is not None:
        _draw(draw, pil, sizes, objects, builder, where)
    shown = {"dataset": dataset, "index": index, "where": where, "format": fmt.name, "conversation": conversation,
             "objects": objects, "sizes": sizes}
    if as_json:
        _print_json(shown, sample)
        return
    _print_text(shown, sample, tokenizer, builder, data_args, fmt, draw)


def _check_draw_target(draw: Path) -> None:
    """``--draw FILE``: a new file in an existing folder (a link, a path under a file, an unwritable folder or a
    too-long name is one line)."""
    from qwenvl.safe_write import target_problem

    why = target_problem(draw, "--draw")
    if why:
        _fail(why)
    if draw.exists() or draw.is_symlink():
        _fail(f"--draw {draw} exists", hint="vlsft never overwrites a file: give a new path")
    if not draw.parent.is_dir():
        _fail(f"--draw {draw}: folder {draw.parent} does not exist", hint="create it or give another path")


def _sources(config: Path | None, overrides: list[str] | None, model: str | None, dictionary: str | None):
    """(model folder, dictionary path, data arguments): from the run YAML (its data.* settings and storage.*),
    else from ``--model`` / ``--dictionary`` (a run folder's saved pixel budget)."""
    from qwenvl.data.arguments import DataArguments

    data_args = DataArguments()
    if config is not None:
        from vlsft.config import load_run_config

        try:
            cfg = load_run_config(config, overrides or [])
        except ProblemsError as exc:
            render.fail(exc)
        from vlsft.plan import storage_overrides

        os.environ.update(storage_overrides(cfg, os.environ))  # the run's storage.* for s3:// reads (this process)
        base = cfg.base_dir
        model = model or _resolve(base, cfg.model.name_or_path)
        dictionary = dictionary or _resolve(base, cfg.data.dictionary)
        for key in owned_by(DataArguments):  # every data argument the run YAML sets (vlsft.keymap)
            setattr(data_args, key.flag, yaml_value(cfg, key))
    if not model or not dictionary:
        _fail("no model or dictionary given", hint="pass --config run.yaml, or both --model DIR and --dictionary FILE")
    if config is None and Path(model).is_dir():
        # --model RUN: the run's pixel budget, saved with its processor (what training, chat and predict use)
        from qwenvl.infer import InferError, saved_pixel_limits

        try:
            for key, value in saved_pixel_limits(model).items():
                setattr(data_args, key, value)
        except InferError as exc:  # a processor file that cannot be used (training would stop on it too)
            render.fail(exc)
    return model, dictionary, data_args


def _check_model(model: str, given: str) -> None:
    """The model folder exists, is a folder and holds a tokenizer (else one line saying which)."""
    p = Path(model)
    hint = f"{given} must be a local model (or tokenizer) directory"
    if not p.exists():
        _fail(f"model directory {model} does not exist", hint=hint)
    if not p.is_dir():
        _fail(f"model directory {model} is not a folder", hint=hint)
    if not (p / "tokenizer_config.json").exists():
        _fail(f"model directory {model} has no tokenizer (tokenizer_config.json)",
              hint="copy the tokenizer files from the base model folder")


def _annotations(dictionary: str, dataset: str, index: int):
    """The dataset's dictionary entry and its annotation records, with ``index`` among them (else one line)."""
    from qwenvl.data.dictionary import load_dictionary

    d = load_dictionary(dictionary, check_files=False)
    # only the named entry must be readable (and the file itself): a LLaMA-Factory catalogue's other entries
    # (alpaca, ranking, hub datasets) are one warning, as a run that does not name them (vlsft.plan)
    errors = [p for p in d.errors if d.dataset_of.get(p) in (None, dataset)]
    if errors:
        render.fail(*errors)
    if dataset not in d.datasets:
        names = d.names or list(d.datasets)
        hint = did_you_mean(dataset, names) or f"known: {', '.join(sorted(names))}"
        _fail(f"no dataset named {dataset!r}", file=str(dictionary), hint=hint)
    others = sorted({d.dataset_of[p] for p in d.errors if d.dataset_of.get(p) not in (None, dataset)})
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        render.print_problems(render.stderr(), [Problem(
            "warning", f"{len(others)} other dataset(s) of this file cannot be read by vlsft ({shown}): not used "
            "by this preview", file=str(dictionary), hint=f"vlsft datasets check {dictionary} says why")])
    spec = d.datasets[dataset]
    from qwenvl.data.store import AnnotationStore

    try:
        store = AnnotationStore.from_file(spec.annotation_path)
    except (OSError, ValueError) as exc:
        _fail(f"cannot read annotations: {exc}", file=spec.annotation_path)
    if not 0 <= index < len(store):
        _fail(f"index {index} out of range: {dataset} has {len(store)} records", hint=f"use 0..{len(store) - 1}")
    return spec, store


def _builder(model: str, data_args):
    """The tokenizer and the trainer's sample builder for the model folder (a tokenizer-only folder is built as
    :data:`~qwenvl.families.TOKENIZER_ONLY_MODEL_TYPE`)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from qwenvl.data.dataset import make_builder
    from qwenvl.families import TOKENIZER_ONLY_MODEL_TYPE, ModelTypeError, read_model_type
    from qwenvl.runpolicy import PROCESSOR_FILES, processor_problem

    has_config = (Path(model) / "config.json").exists()  # else a tokenizer folder: built as Qwen2.5-VL
    try:  # first: the tokenizer reads config.json too, and would be blamed for it
        model_type = read_model_type(model) if has_config else TOKENIZER_ONLY_MODEL_TYPE
    except ModelTypeError as exc:  # unreadable, or not a supported family
        render.fail(exc)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - a corrupt tokenizer file fails in many ways (json, tokenizers)
        _fail(f"{model} has no usable tokenizer ({_first_line(exc)})",
              hint="copy tokenizer.json / tokenizer_config.json from the base model folder")
    problem = processor_problem(model)  # training would stop on it: not silently replaced by the defaults
    if problem:
        _fail(problem, hint="re-save the processor, or copy preprocessor_config.json from the base model folder")
    try:
        image_processor = AutoImageProcessor.from_pretrained(model)
    except Exception as exc:  # noqa: BLE001 - as the tokenizer
        if (Path(model) / PROCESSOR_FILES[0]).is_file():  # (preprocessor_config.json: the image processor's own)
            _fail(f"{model} has no usable image processor ({_first_line(exc)})",
                  hint="re-save the processor, or copy preprocessor_config.json from the base model folder")
        image_processor = None  # no processor saved: the family's defaults (as training)
    return tokenizer, make_builder(tokenizer, image_processor, data_args, model_type)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _record_or_fail(store, index: int, where: str, fmt, as_json: bool) -> None:
    """The record at ``index`` parses (else a bad sample, as the trainer skips it: one line and exit 1)."""
    try:
        store[index]
    except ValueError as exc:
        why = str(exc).removeprefix(f"{where}: ")  # (the store's message starts with the place)
        if as_json:
            print(json.dumps({"bad_sample": why, "where": where, "format": fmt.name}))
            raise typer.Exit(1) from None
        _fail(f"bad sample (skipped in training): {why}", file=where, code=1)


def _build_or_fail(builder, record, data_path, fmt, where, as_json: bool) -> dict:
    """The sample as the trainer builds it; a bad one is one line and exit 1 (the trainer skips it)."""
    from qwenvl.data.preprocess import BadSample
    from qwenvl.data.vision import MediaError

    try:
        return builder.build(record, data_path, fmt)
    except Exception as exc:  # the trainer skips a sample on any error; so does preview (one line, exit 1)
        if not isinstance(exc, (BadSample, MediaError, ValueError)):
            exc = f"{type(exc).__name__}: {exc}"
        if as_json:
            print(json.dumps({"bad_sample": str(exc), "where": where, "format": fmt.name}))
            raise typer.Exit(1) from None
        _fail(f"bad sample (skipped in training): {exc}", file=where, code=1)


def _draw(draw: Path, pil, sizes, objects, builder, where) -> None:
    """``--draw``: the image(s) as the model sees them with the boxes, written by temp + rename."""
    from qwenvl.data import grounding

    if not pil:
        _fail("--draw: the sample has no image", file=where, hint="preview a sample with an image")
    from qwenvl.safe_write import Interrupted, UnsafeTarget, atomic_file

    try:
        with atomic_file(draw, "--draw", mode="wb") as fh:  # temp + rename: no half-written PNG is left
            grounding.draw(pil, sizes, objects, builder.family.grounding, fh)
    except UnsafeTarget as exc:
        render.fail(exc)
    except Interrupted as exc:
        render.fail(exc.message(str(draw)), code=128 + exc.signum)


def _grid(sample: dict, key: str) -> list | None:
    return sample[key].tolist() if key in sample else None


def _print_json(shown: dict, sample: dict) -> None:
    spg = sample.get("second_per_grid_ts")
    print(json.dumps({
        "dataset": shown["dataset"], "index": shown["index"], "where": shown["where"], "format": shown["format"],
        "conversation": shown["conversation"],
        "input_ids": sample["input_ids"].tolist(), "labels": sample["labels"].tolist(),
        "position_ids": sample["position_ids"].tolist(),
        "image_grid_thw": _grid(sample, "image_grid_thw"), "video_grid_thw": _grid(sample, "video_grid_thw"),
        "second_per_grid_ts": spg.tolist() if spg is not None else None,
        "frame_idx": sample.get("frame_idx"), "video_timestamps": sample.get("video_timestamps"),
        "pixel_values": _stats(sample.get("pixel_values")),
        "pixel_values_videos": _stats(sample.get("pixel_values_videos")),
        "objects": shown["objects"],
        "image_sizes": [{"original": list(o), "resized": list(r)} for o, r in shown["sizes"]],
    }))


def _print_text(shown: dict, sample: dict, tokenizer, builder, data_args, fmt, draw: Path | None) -> None:
    out = render.stdout()
    enc = builder.encoder
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    out.print(f"[bold]{shown['dataset']}[/bold] #{shown['index']} ({render.markup(shown['where'])}), "
              f"format {shown['format']}")
    for turn in shown["conversation"]:
        note = "" if turn["trained"] or turn["role"] != "assistant" else " [dim](not trained)[/dim]"
        out.print(f"[dim]{turn['role']}:[/dim] {render.markup(repr(turn['content']))}{note}", highlight=False)
    _render_text(out, tokenizer, ids, labels, {enc.image_pad: "<|image_pad|>", enc.video_pad: "<|video_pad|>"})
    trained = sum(1 for x in labels if x != -100)
    out.print(f"tokens: {len(ids)} (trained {trained}, masked {len(ids) - trained}); "
              f"model_max_length {data_args.model_max_length}")
    _print_media(out, sample, builder)
    sizes = shown["sizes"]
    for obj in shown["objects"]:
        o, r = sizes[obj["image"]]
        out.print(f"object {obj['label']!r}: {obj['kind']} {obj['values']} ({builder.model_type}, image "
                  f"{obj['image']} {o[0]}x{o[1]} -> {r[0]}x{r[1]}, from {obj.get('bbox_format', fmt.bbox_format)} "
                  f"{_given(obj)})",
                  highlight=False)
    if draw is not None:
        out.print(f"drawn: {render.markup(str(draw))}", highlight=False)
    out.print("[dim]legend: dim = masked (context), [/dim][bold green]green = trained[/bold green]")


def _print_media(out, sample: dict, builder) -> None:
    """One line per image and per video: grid, tokens, pixels, frames (and time stamps or second_per_grid_ts)."""
    m2 = builder.spec.merge_size ** 2
    for k, g in enumerate(_grid(sample, "image_grid_thw") or []):
        out.print(f"image {k}: grid t,h,w = {g} -> {g[0] * g[1] * g[2] // m2} tokens "
                  f"({g[1] * builder.spec.patch_size}x{g[2] * builder.spec.patch_size} px)")
    stamps = sample.get("video_timestamps")  # the Qwen3 families (HEAD layout): <X.Y seconds> per temporal patch
    for k, g in enumerate(_grid(sample, "video_grid_thw") or []):
        frames = sample["frame_idx"][k]
        if stamps is not None:
            from qwenvl.data.chat_head import timestamp_text

            out.print(f"video {k}: {len(frames)} frames {frames} -> grid t,h,w = {g}: {g[0]} temporal patches x "
                      f"{g[1] * g[2] // m2} tokens = {g[0] * g[1] * g[2] // m2} vision tokens; timestamps "
                      + " ".join(timestamp_text(t) for t in stamps[k]), highlight=False)
            continue
        out.print(f"video {k}: grid t,h,w = {g} -> {g[0] * g[1] * g[2] // m2} tokens; frames "
                  f"{frames}; second_per_grid_ts {float(sample['second_per_grid_ts'][k]):.4g}")

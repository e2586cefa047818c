"""``vlsft predict``: generate an answer for every sample of a dataset of the dictionary, with metrics.

    vlsft predict runs/demo --dataset facts --out preds.jsonl             # the run's saved dictionary
    vlsft predict runs/demo --dataset facts --out preds.jsonl --resume    # append only what is missing

One JSONL row per sample: ``{dataset, index, where, prompt, reference, prediction}`` (``index`` = the record's
position in its annotation file, ``where`` = file:line). The prompt is the sample's first user turn (its media
first, then the text without ``<image>``/``<video>`` tags), the reference its first assistant answer. Generation
is greedy, batched (``--batch-size``), through :mod:`qwenvl.infer` (the run's processor, chat template and pixel
limits). At the end a metrics summary over every row of the file (exact match, normalised exact match, token F1)
is printed and written next to it (``<out>.metrics.json``). Exit 0, or 2 with one ``error:`` line: a folder
that is not a model (or has no tokenizer, or processor settings that cannot be read: refused before the model
loads; ``--out`` is created only once it loaded), a dataset name that does not exist, an output file that exists without ``--resume``, or
one that is not a predictions file (``--resume`` appends only to a file whose every row has :data:`ROW_KEYS`;
a cut last row, left by an interrupted write, is dropped with a warning and predicted again).
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
from collections import Counter
from pathlib import Path

import typer

from vlsft.app import app

ROW_KEYS = ("dataset", "index", "where", "prompt", "reference", "prediction")  # every row, in this order
ROW_START = '{"dataset": '  # how each row begins (json.dumps keeps the keys' order)


def resume_rows(text: str, name: str) -> tuple[list[dict], int, str | None]:
    """The rows of an existing ``--out`` (its ``text``) to resume from, how many characters of ``text`` to keep,
    and a warning when its last row, cut by an interrupted write (no newline after it), is dropped.

    :class:`~qwenvl.problems.UserError` when ``text`` is not a predictions file written by vlsft predict (a line
    that is not a JSON object with every key of :data:`ROW_KEYS`): never append to a user's own file."""
    from qwenvl.problems import UserError

    rows: list[dict] = []
    lines = text.split("\n")  # not splitlines(): a prediction may hold U+2028 and other line breaks
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cut = n == len(lines)  # no newline after it: what an interrupted write leaves
        if cut and line.startswith(ROW_START):
            return rows, len(text) - len(line), (f"--out {name} line {n} is a row cut by an interrupted write: "
                                                 "dropped it, its sample is predicted again")
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        missing = [k for k in ROW_KEYS if k not in row] if isinstance(row, dict) else None
        if missing == [] and not cut:
            rows.append(row)
            continue
        why = "is not a JSON object" if missing is None else f"lacks {', '.join(missing)}" if missing else \
            "has no newline at its end"
        raise UserError(f"--out {name} is not a predictions file written by vlsft predict (line {n} {why}): "
                        "choose another --out (nothing was written)")
    return rows, len(text), None


def _read_resume(out: Path) -> tuple[list[dict], int | None, str | None]:
    """:func:`resume_rows` of the file ``out``; the byte length to cut it to (None: keep it whole)."""
    from qwenvl.problems import UserError

    try:
        text = out.read_bytes().decode("utf-8")
    except OSError as e:
        raise UserError(f"cannot read --out {out}: {e.strerror or e}: choose another --out") from None
    except UnicodeDecodeError:
        raise UserError(f"--out {out} is not a predictions file written by vlsft predict (not UTF-8 text): "
                        "choose another --out (nothing was written)") from None
    rows, keep, note = resume_rows(text, str(out))
    return rows, (len(text[:keep].encode("utf-8")) if keep < len(text) else None), note


def normalise(text: str) -> str:
    """Lower case, no punctuation, no articles (a, an, the), single spaces (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    p, r = normalise(prediction).split(), normalise(reference).split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


METRICS = {
    "exact_match": lambda p, r: float(p.strip() == r.strip()),
    "normalised_exact_match": lambda p, r: float(normalise(p) == normalise(r)),
    "token_f1": token_f1,
}


def summarise(rows: list[dict]) -> dict:
    out: dict = {"samples": len(rows)}
    for name, fn in METRICS.items():
        out[name] = round(sum(fn(x["prediction"], x["reference"]) for x in rows) / len(rows), 4) if rows else 0.0
    return out


def _dictionary_of(model_dir: Path) -> Path | None:
    for folder in (model_dir, model_dir.parent):
        p = folder / "vlsft" / "Dataset-Dictionary.json"
        if p.is_file():
            return p
    return None


def _original_bases(saved: Path) -> list[str]:
    """Folders the relative paths of a run's saved dictionary copy (``<run>/vlsft/Dataset-Dictionary.json``) may
    start at, best first: the original dictionary's folder (``data.dictionary`` in the run's ``run.yaml``, absolute),
    then the same place relative to the run (the original and the run moved together). Empty when the run does not
    record its dictionary (the copy's own folder is all there is)."""
    import posixpath

    import yaml

    from qwenvl import storage

    run = saved.parent.parent
    try:
        cfg = yaml.safe_load((saved.parent / "run.yaml").read_text(encoding="utf-8"))
        original = str(cfg["data"]["dictionary"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return []
    if storage.is_url(original):
        return [posixpath.dirname(original)]
    folder = os.path.dirname(os.path.abspath(original))
    bases = [folder]
    out_dir = (cfg.get("output") or {}).get("dir") if isinstance(cfg.get("output"), dict) else None
    if isinstance(out_dir, str) and out_dir and not storage.is_url(out_dir):
        moved = os.path.normpath(os.path.join(str(run.absolute()), os.path.relpath(folder, os.path.abspath(out_dir))))
        if moved != folder:
            bases.append(moved)
    return bases


def _sources(dataset: str, dict_path: Path, saved: bool):
    """The selected dataset's source, its store loaded. A run's saved copy resolves its relative paths as the
    original did (:func:`_original_bases`: the first base whose annotation file exists)."""
    from qwenvl import storage
    from qwenvl.data.registry import build_index, resolve_sources
    from qwenvl.problems import UserError

    bases: list[str | None] = [*(_original_bases(dict_path) if saved else []), None]
    sources = resolve_sources(dataset, str(dict_path), base_dir=bases[0])
    for base in bases[1:]:
        ann = sources[0].annotation_path
        if storage.is_url(ann) or os.path.exists(ann):
            break
        found = resolve_sources(dataset, str(dict_path), base_dir=base)
        if storage.is_url(found[0].annotation_path) or os.path.exists(found[0].annotation_path):
            sources = found
            break
    try:
        build_index(sources, 0)  # loads the store and settles the format
    except OSError as exc:
        where = f" (the copy saved with the run, {dict_path})" if saved else f" ({dict_path})"
        raise UserError(f"cannot read the annotations of dataset '{dataset}' at {sources[0].annotation_path}"
                        f"{where}: {getattr(exc, 'strerror', None) or exc}; pass --dictionary PATH naming where the "
                        "data is now") from None
    return sources


def _items(src, data_path: str | None, ground=None):
    """(index, where, prompt text, images, videos, reference, frames per second of frame-image videos) for every
    usable record of ``src``; a video given as frame images is a list of their paths."""
    from qwenvl import storage
    from qwenvl.data import formats
    from qwenvl.data.sample import frame_fps

    for i in range(len(src.store)):
        internal, _extras, problems = formats.sample_problems(src.store[i], src.fmt)
        if internal is None or any(p[0] == "error" for p in problems):
            continue
        # official turns ({from: human|gpt, value}) or normalised ones ({role: user|assistant, content})
        conv = [{"role": {"human": "user", "gpt": "assistant"}.get(t.get("from"), t.get("role")),
                 "content": t.get("value", t.get("content"))} for t in internal.get("conversations") or []
                if isinstance(t, dict)]
        user = next((t for t in conv if t["role"] == "user"), None)
        if user is None:
            continue
        after = conv[conv.index(user) + 1:]
        answer = next((t for t in after if t["role"] == "assistant"), None)
        media = {}
        for key in ("image", "video"):
            v = internal.get(key)
            vals = [] if v is None else (v if isinstance(v, list) else [v])
            # a video given as frame images (a tuple) stays one video: its frames, each resolved
            media[key] = [[storage.join(data_path, f) for f in x] if isinstance(x, tuple) else storage.join(data_path, x)
                          for x in vals if isinstance(x, (str, tuple))]
        if ground is not None and internal.get("objects"):  # grounding: <ref>/<bbox>/... in the model's convention
            ground.render(conv, internal, media["image"])
        text = re.sub(r"<(image|video)>\n?", "", str(user.get("content") or "")).strip()
        reference = str((answer or {}).get("content") or "")
        if "</think>" in reference:  # thinking data: the answer after the reasoning is what is compared
            from qwenvl.data.chat_qwen35 import split_reasoning

            reference = split_reasoning(reference)[1].strip()
        yield i, src.store.where(i), text, media["image"], media["video"], reference, frame_fps(internal, src.fmt)


def _grounding_metrics(src, rows: list[dict], ground) -> dict:
    """``{"boxes", "iou@0.5", "mean_iou"}`` over the rows whose record has ``objects`` boxes (empty when none):
    predicted boxes parsed in the model family's convention, mapped back to original-image pixels."""
    from qwenvl import storage
    from qwenvl.data import formats
    from qwenvl.data.grounding import grounding_metrics

    per_box: list[float] = []
    for row in rows:
        i = row.get("index")
        if row.get("dataset") != src.name or not isinstance(i, int) or not 0 <= i < len(src.store):
            continue
        internal = formats.sample_problems(src.store[i], src.fmt)[0]
        if not isinstance(internal, dict) or not internal.get("objects"):
            continue
        img = internal.get("image")
        paths = [x for x in ([] if img is None else img if isinstance(img, list) else [img]) if isinstance(x, str)]
        paths = [storage.join(src.data_path, x) for x in paths]
        got = ground.ious(internal, paths, str(row.get("prediction") or ""))
        if got is not None:
            per_box += got
    return grounding_metrics(per_box) if per_box else {}


@app.command("predict")
def predict_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A run's output dir, a checkpoint-N folder "
                                     "or a vlsft export."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset name of the dictionary."),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL file to write (one row per sample)."),
    dictionary: Path = typer.Option(None, "--dictionary", help="Dataset dictionary JSON (default: the one saved "
                                    "with the run, <run>/vlsft/Dataset-Dictionary.json, its relative paths "
                                    "resolved against the original dictionary's folder)."),
    resume: bool = typer.Option(False, "--resume", help="Append only the samples --out does not hold yet."),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Samples per generate call."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens per answer."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N samples."),
    reasoning_effort: str = typer.Option(None, "--reasoning-effort", metavar="EFFORT", help="Qwen3.5 / 3.6 / 3.8 "
                                         "chat templates: none = thinking off, xhigh / medium / low = Qwen3.8's "
                                         "effort (default: the dataset's reasoning_effort, else the template's)."),
) -> None:
    """Generate answers over a dataset: JSONL rows and a metrics summary (exact match, normalised EM, token F1)."""
    from qwenvl.problems import UserError
    from vlsft.render import fail

    try:
        done, cut, note, dict_path = _predict_inputs(model_dir, out, dictionary, resume)
        sources = _sources(dataset, dict_path, saved=dictionary is None)
        src = sources[0]
        from qwenvl.data.grounding import PredictGrounding

        ground = PredictGrounding.for_model(model_dir, getattr(src.fmt, "bbox_format", None))
        items = list(_items(src, src.data_path, ground))
        if limit:
            items = items[:limit]
        have = {(x.get("dataset"), x.get("index")) for x in done}
        todo = [it for it in items if (src.name, it[0]) not in have]
        if todo:
            from qwenvl.templates import generation_kwargs

            try:  # the prompt as training rendered the dataset (its reasoning_effort), unless told otherwise
                kwargs = generation_kwargs(reasoning_effort or getattr(src.fmt, "reasoning_effort", None))
            except ValueError as e:
                raise UserError(f"--reasoning-effort: {e}") from None
            engine = _load(model_dir, kwargs)
            _prepare_out(out, cut, note)  # only once the model loaded: a failed load leaves no --out behind
            _generate(engine, src.name, todo, out, done, batch_size, max_new_tokens)
        else:
            _prepare_out(out, cut, note)
        metrics = summarise(done)
        metrics.update(_grounding_metrics(src, done, ground))
        from qwenvl.safe_write import atomic_file

        with atomic_file(str(out) + ".metrics.json", "--out", exclusive=False) as fh:  # ours: replaced whole
            fh.write(json.dumps(metrics, indent=1))
        typer.echo(f"{len(todo)} new row(s), {len(done)} in {out}; " + ", ".join(
            f"{k} {v}" for k, v in metrics.items() if k != "samples"))
    except UserError as exc:
        fail(exc)


def _predict_inputs(model_dir: Path, out: Path, dictionary: Path | None, resume: bool):
    """(the rows --out already holds, where to cut a torn last row and the note saying so, the dictionary path);
    one line for an unusable --out, model folder or dictionary, and for an existing --out without --resume."""
    from qwenvl import infer
    from qwenvl.problems import UserError

    if not os.path.isfile(out):  # a new file: a link, a path under a file, an unwritable folder, a long name
        from qwenvl.safe_write import check_target

        check_target(out, "--out")
    infer.model_kind(model_dir)
    dict_path = dictionary or _dictionary_of(model_dir)
    if dict_path is None:
        raise UserError(f"no dataset dictionary saved with {model_dir}: pass --dictionary PATH")
    if out.exists() and not resume:
        raise UserError(f"--out {out} exists: pass --resume to append only what is missing, or choose a new "
                        "file (nothing was overwritten)")
    done: list[dict] = []
    cut, note = None, None
    if out.exists():  # before anything else: a file that is not ours is refused untouched
        done, cut, note = _read_resume(out)
    infer.check_folder(model_dir)  # its tokenizer and processor settings, long before the weights load
    return done, cut, note, dict_path


def _prepare_out(out: Path, cut: int | None, note: str | None) -> None:
    """--out exists (and ends on a whole row) before the model is loaded; an OS error is one line."""
    from qwenvl.problems import UserError

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if cut is not None:  # the cut last row: dropped, so that the next row starts on a line of its own
            os.truncate(out, cut)
            print(f"warning: {note}", file=sys.stderr)
        out.touch()
    except OSError as e:
        from qwenvl.safe_write import os_error_line

        raise UserError(os_error_line(e, out, "--out")) from None


def _load(model_dir: Path, template_kwargs: dict | None = None):
    """The inference engine for ``model_dir`` (:func:`qwenvl.infer.load`), its budget warning printed."""
    from qwenvl import infer

    engine = infer.load(model_dir)
    engine.template_kwargs = dict(template_kwargs or {})
    warning = engine.budget_warning()
    if warning:
        print(warning, file=sys.stderr)
    return engine


def _generate(engine, name: str, todo: list, out: Path, done: list[dict], batch_size: int,
              max_new_tokens: int) -> None:
    """Answer ``todo`` in batches, appending one row per sample to --out (and to ``done``) as each batch ends; a
    generated ``...</think>`` reasoning goes to the row's ``reasoning``, the answer after it is the prediction."""
    from qwenvl.data.chat_qwen35 import split_reasoning

    with open(out, "a", encoding="utf-8") as fh:
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            answers = engine.generate_batch([engine.messages(t, images=im, videos=vi, frame_fps=fps)
                                             for _i, _w, t, im, vi, _r, fps in chunk], max_new_tokens=max_new_tokens)
            for (i, where, text, _im, _vi, ref, _fps), pred in zip(chunk, answers, strict=True):
                reasoning, pred = split_reasoning(pred)
                row = {"dataset": name, "index": i, "where": where, "prompt": text, "reference": ref,
                       "prediction": pred.strip() if reasoning is not None else pred}
                if reasoning is not None:
                    row["reasoning"] = reasoning.strip()
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                done.append(row)
            fh.flush()
            print(f"predict: {min(s + batch_size, len(todo))}/{len(todo)} new samples", file=sys.stderr)

"""``vlsft export``: turn a LoRA run or checkpoint into something that loads anywhere.

    vlsft export runs/lora-7b --out exports/lora-7b-adapter            # adapter + processor + base reference
    vlsft export runs/lora-7b/checkpoint-500 --out exports/merged --merge   # a full model, no PEFT needed

Without ``--merge``: the adapter (PEFT layout) with the fully-trained parts, tokenizer, processor (pixel limits),
chat template and the base model's path (``qwenvl.export.load_adapter_export`` loads it). With ``--merge``: the
base model with adapters and trained parts merged in, in the standard Hugging Face layout
(``AutoModelForImageTextToText`` + ``AutoProcessor``). Runs on CPU; never overwrites: ``--out`` must be new or
empty. Exit 0 done, 2 for bad input (one ``error:`` line: a source that is not whole names the missing piece, a
bad ``--out`` - a link, a path under a file, an unwritable folder, a too-long name - says what to give instead;
before the model is loaded and anything is written), 128 + N when stopped by signal N (the temporary folder
removed). See :mod:`qwenvl.export`.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vlsft.app import app


@app.command("export")
def export_cmd(
    source: Path = typer.Argument(..., metavar="RUN_OR_CHECKPOINT", help="A LoRA run's output dir (its final "
                                  "adapter, else the newest complete checkpoint) or one checkpoint-N folder."),
    out: Path = typer.Option(..., "--out", "-o", help="New or empty folder to write the export into."),
    merge: bool = typer.Option(False, "--merge", help="Merge the adapters into the base weights and write a full "
                               "model (standard Hugging Face layout)."),
    base: str = typer.Option(None, "--base", help="The base model folder, when it moved since training (default: "
                             "the one recorded in vlsft-lora.json)."),
) -> None:
    """Export a LoRA adapter (with processor and base reference) or, with --merge, a merged full model."""
    from qwenvl.problems import UserError
    from vlsft.render import fail, stderr

    console = stderr()
    from qwenvl.safe_write import Interrupted

    try:
        from qwenvl.export import export

        with console.status("exporting") as status:
            done = export(source, out, merge=merge, base=base, say=lambda m: status.update(m) or console.log(m))
    except UserError as exc:
        fail(exc)
    except Interrupted as exc:  # the temporary folder is already removed
        import signal

        fail(f"export interrupted by {signal.Signals(exc.signum).name}: nothing was written to {out}; run it "
             "again to export", code=128 + exc.signum)
    what = "merged model" if merge else "adapter"
    typer.echo(f"exported the {what} to {done}")

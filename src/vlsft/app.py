"""The Typer application objects. Command modules register themselves on these.

Kept free of torch/transformers: `vlsft datasets check` and `vlsft print-args` must start fast.
Heavy imports happen inside the command functions that need them (train, preview).
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="vlsft",
    help="Fine-tune Qwen2-VL / Qwen2.5-VL / Qwen3-VL on your own data: check datasets, print the launch, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
datasets_app = typer.Typer(
    help="Inspect a dataset dictionary: check it, build --dataset_use, preview a sample.",
    no_args_is_help=True,
)
app.add_typer(datasets_app, name="datasets")

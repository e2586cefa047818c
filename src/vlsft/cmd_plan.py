"""``vlsft print-args``: show the exact launch a run YAML makes, and start nothing.

    vlsft print-args --config configs/qwen2.5-vl-7b.yaml
    vlsft print-args --config run.yaml training.learning_rate=1e-5 distributed.nnodes=2
    vlsft print-args --config run.yaml --json | jq -r '.torchrun | @sh'

Prints the torchrun command (one option per line, ``\\``-continued, ready to paste), the environment
``vlsft train`` sets (secrets as ``***``), the dataset mix, the batch formula, samples and optimizer steps,
and warnings for known traps. Exit 0 when the plan is valid (warnings allowed), 2 on config or dataset
dictionary errors (one line each: ``file:line:col: error: [key] what (hint: how to fix)``).
Never imports torch or transformers.
"""

from __future__ import annotations

from pathlib import Path

import typer

from vlsft.app import app
from vlsft.print_args import (  # noqa: F401 - re-exported: vlsft train renders its plan with them
    OVERRIDES_HELP,
    format_command,
    group_argv,
    memory_check,
    render_text,
    run,
    time_line,
)


@app.command("print-args")
def print_args(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help=OVERRIDES_HELP, show_default=False),
    config: Path = typer.Option(..., "--config", "-c", help="Run YAML (see configs/qwen2.5-vl-7b.yaml).",
                                dir_okay=False),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as one JSON object (secrets masked)."),
    gpu_memory: str = typer.Option(None, "--gpu-memory", metavar="SIZE",
                                   help="Memory of the GPUs it will run on (e.g. 80GiB): a run whose estimate does "
                                        "not fit is refused. For planning on a machine without those GPUs."),
    gpu: str = typer.Option(None, "--gpu", metavar="KIND",
                            help="The GPU kind it will run on (e.g. H100, A100): adds the expected time per epoch."),
) -> None:
    """Print the torchrun command, environment, batch and step arithmetic of a run YAML; start nothing."""
    run(config, overrides, as_json, gpu_memory, gpu)  # (vlsft.cli runs plain command lines without Typer)

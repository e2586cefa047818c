"""Entry point of the `vlsft` command.

Command modules register themselves on :data:`vlsft.app.app` when imported. To keep the front door fast,
:func:`main` imports only the module(s) of the command being run (``vlsft print-args`` never loads rich
or the dataset scanner); ``vlsft``, ``vlsft --help`` and anything unrecognised import them all, so the
help always lists every command. ``from vlsft.cli import app`` (tests, embedding) also registers them all.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

# First command-line word -> the modules that define its commands. Keep in sync with the @app.command /
# @datasets_app.command decorators (tests/test_print_args_cli.py checks that --help lists all of them).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "print-args": ("vlsft.cmd_plan",),
    "train": ("vlsft.cmd_train",),
    "datasets": ("vlsft.cmd_datasets", "vlsft.cmd_preview"),
    "export": ("vlsft.cmd_export",),
    "chat": ("vlsft.cmd_chat",),
    "predict": ("vlsft.cmd_predict",),
}
ALL_MODULES: tuple[str, ...] = ("vlsft.cmd_chat", "vlsft.cmd_datasets", "vlsft.cmd_export", "vlsft.cmd_plan",
                                "vlsft.cmd_predict", "vlsft.cmd_preview", "vlsft.cmd_train")


def _register(modules: tuple[str, ...]) -> Any:
    for name in modules:
        importlib.import_module(name)
    from vlsft.app import app

    return app


def __getattr__(name: str) -> Any:  # `from vlsft.cli import app`: every command registered
    if name == "app":
        return _register(ALL_MODULES)
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "print-args":  # a dry run that starts nothing: no pydantic plugins (their entry-point
        os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "1")  # scan over every installed package costs ~10 ms)
        from vlsft.print_args import fast_main

        if fast_main(args[1:]):  # the plain command lines without Typer; the rest (help, mistakes) with it
            raise SystemExit(0)  # as Typer's app ends: main() always exits
    # `vlsft`, `vlsft --help`, or an unknown word: load every command so help and errors list them all.
    app = _register(COMMAND_MODULES.get(args[0], ALL_MODULES) if args else ALL_MODULES)
    app(args=args)


if __name__ == "__main__":
    main()

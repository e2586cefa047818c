"""Entry point of the `vlsft` command: imports the command modules so they register."""

from __future__ import annotations

from vlsft import cmd_datasets, cmd_plan, cmd_preview, cmd_train  # noqa: F401  (registration)
from vlsft.app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()

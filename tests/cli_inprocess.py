"""`vlsft ARGS` run in the test's own process (Typer's CliRunner) for tests that compare what a command prints.

A `vlsft datasets preview` subprocess spends ~5 s of CPU importing torch / transformers and loading the processor
before it reads one sample; in process the imports happen once per session. The command code is the same
(``vlsft.cli.app``). Tests of the process itself (exit paths, signals, no traceback on stderr, what a fresh
interpreter imports) keep the real subprocess: test_preview_cli, test_cli_imports, test_safe_write's refusals.
"""

from __future__ import annotations

import subprocess
import traceback


def vlsft(*args: str) -> subprocess.CompletedProcess:
    """Run ``vlsft ARGS`` in process; an uncaught exception appears on stderr as a traceback (as it would)."""
    from typer.testing import CliRunner

    from vlsft.cli import app

    r = CliRunner().invoke(app, list(args))
    stderr = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        stderr += "".join(traceback.format_exception(r.exception))
    return subprocess.CompletedProcess(["vlsft", *args], r.exit_code, r.stdout, stderr)

"""`vlsft print-args` without Typer (issue 23 item 5): :func:`vlsft.print_args.fast_main` runs the plain command
lines and says exactly what the Typer command says (same stdout, same exit code); everything else is Typer's."""

from __future__ import annotations

import pytest
from plan_fixtures import make_project
from typer.testing import CliRunner

from vlsft import print_args
from vlsft.cli import app


@pytest.mark.parametrize("args", [
    ["--help"], ["-h"], [], ["--config"], ["-c"], ["--config", "--json"], ["--json"], ["--config", "a", "-c", "b"],
    ["--config", "a", "--json", "--json"], ["--config", "a", "--json=1"], ["--config", "a", "--"],
    ["--config", "a", "--bogus"], ["--config", "a", "-x"], ["--config=", "x"], ["--config", "a", ""],
    ["--gpu", "--config", "a"], ["--config", "a", "--gpu-memory"], ["-ca"], ["--configs", "a"],
])
def test_anything_but_a_plain_command_line_is_typers(args):
    assert print_args.parse_fast(args) is None


def test_plain_command_lines_are_read_as_typer_reads_them(tmp_path):
    folder = tmp_path / "cfg.yaml"
    folder.mkdir()
    assert print_args.parse_fast(["--config", str(folder)]) is None  # a folder: Typer's "is a directory"
    got = print_args.parse_fast(["a.yaml=b", "-c", "run.yaml", "x.y=1", "--json", "--gpu=H100", "--gpu-memory",
                                 "80GiB"])
    assert got is not None and str(got.pop("config")) == "run.yaml"
    assert got == {"overrides": ["a.yaml=b", "x.y=1"], "as_json": True, "gpu": "H100", "gpu_memory": "80GiB"}
    got = print_args.parse_fast(["--config=run.yaml"])
    assert got is not None and got["overrides"] == [] and got["as_json"] is False and got["gpu"] is None


def _typer(args: list[str]):
    r = CliRunner().invoke(app, ["print-args", *args])
    return r.exit_code, r.stdout


def _fast(args: list[str], capsys):
    code = 0
    try:
        assert print_args.fast_main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().out


@pytest.mark.parametrize("extra", [[], ["--json"], ["training.learning_rate=1e-5", "--gpu", "H100"],
                                   ["training.report_to=wandb"], ["training.bogus=1"], ["--gpu-memory", "1GiB"],
                                   ["--gpu-memory", "lots"]])
def test_fast_path_prints_what_typer_prints(tmp_path, capsys, extra):
    cfg = str(make_project(tmp_path))
    for args in (["--config", cfg, *extra], [*extra, f"--config={cfg}"]):
        assert _fast(args, capsys) == _typer(args)


def test_cli_main_takes_the_fast_path_and_hands_help_to_typer(tmp_path, capsys, monkeypatch):
    cfg = str(make_project(tmp_path))
    calls = []
    monkeypatch.setattr(print_args, "run", lambda **kw: calls.append(kw))
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "1")  # (main sets it for print-args: restored after the test)
    from vlsft.cli import main

    with pytest.raises(SystemExit) as e:  # main() always exits, as Typer's app does (code 0 here)
        main(["print-args", "--config", cfg])
    assert e.value.code == 0 and len(calls) == 1
    with pytest.raises(SystemExit) as e:
        main(["print-args", "--help"])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out and len(calls) == 1

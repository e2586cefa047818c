"""`vlsft print-args` through Typer's CliRunner and as a real subprocess: output, --json schema, exit codes,
no torch/transformers import, speed, and secrets never printed."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time

import pytest
from plan_fixtures import RUN_YAML, make_project
from typer.testing import CliRunner

from vlsft.cli import app
from vlsft.plan import plan_from_file

VLSFT = [sys.executable, "-m", "vlsft"]
JSON_TYPES = {"torchrun": list, "trainer_args": list, "dataset_use": str, "env": dict, "world_size": int,
              "effective_batch_size": int, "samples_per_epoch": int, "steps_per_epoch": int, "total_steps": int,
              "eval_samples": int, "eval_every": type(None), "family": str, "family_limits": list,
              "family_from_id": bool, "model": type(None),
              "memory_gib": type(None), "chat": dict, "warnings": list}


def command_block(text: str) -> str:
    """The shell command printed under '# Command:' (up to the blank line)."""
    block = text.split("# Command:\n", 1)[1].split("\n\n", 1)[0]
    return block


def test_text_output_is_copy_pasteable(tmp_path):
    path = make_project(tmp_path)
    result = CliRunner().invoke(app, ["print-args", "--config", str(path), "training.learning_rate=1e-5"])
    assert result.exit_code == 0, result.output
    plan = plan_from_file(path, ["training.learning_rate=1e-5"])
    block = command_block(result.output)
    lines = block.splitlines()
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert "  --nnodes 2 \\" in lines and "  -m qwenvl.train \\" in lines and "  --learning_rate 1e-05 \\" in lines
    assert shlex.split(block.replace("\\\n", " ")) == plan.torchrun
    assert "effective batch = 4 × 4 × 8 × 2 = 256" in result.output
    assert "samples per epoch = 1,250" in result.output
    assert "steps per epoch = ceil(1250 / 256) = 5" in result.output
    assert "total steps = ceil(3 x 5) = 15" in result.output
    assert "docs%50,charts%250" in result.output
    assert "export WANDB_MODE=disabled" in result.output


def test_warnings_printed(tmp_path):
    path = make_project(tmp_path)
    result = CliRunner().invoke(app, ["print-args", "-c", str(path), "training.learning_rate=2e-7"])
    assert result.exit_code == 0
    assert "warning: training.learning_rate 2e-07 is tiny" in result.output


def test_json_schema_exact(tmp_path):
    path = make_project(tmp_path)
    result = CliRunner().invoke(app, ["print-args", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert list(doc) == list(JSON_TYPES)
    for key, kind in JSON_TYPES.items():
        assert type(doc[key]) is kind, key
    assert all(isinstance(a, str) for a in doc["torchrun"] + doc["trainer_args"])
    assert doc["effective_batch_size"] == 256 and doc["world_size"] == 16
    assert doc["samples_per_epoch"] == 1250 and doc["steps_per_epoch"] == 5 and doc["total_steps"] == 15
    assert doc["dataset_use"] == "docs%50,charts%250" and doc["warnings"] == []


def test_config_errors_exit_2_one_line_each(tmp_path):
    path = make_project(tmp_path, run_yaml=RUN_YAML.replace("  learning_rate: 2e-5", "  learnig_rate: 2e-5"))
    result = CliRunner().invoke(app, ["print-args", "--config", str(path), "distributed.nnodes=x"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert f"{path}:10:3: error: [training.learnig_rate] unknown key (hint: did you mean 'learning_rate'?)" in lines
    assert any(line.startswith("override 'distributed.nnodes=x': error: [distributed.nnodes]") for line in lines)
    assert len(lines) == 2 and "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["print-args", "--config", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "nope.yaml: error: file not found" in missing.output


@pytest.mark.slow
def test_subprocess_no_heavy_imports_and_fast(tmp_path, cli_env):
    """The real command in a fresh interpreter: exit codes, no torch/transformers, and its wall time."""
    path = make_project(tmp_path)
    probe = ("import sys, runpy\n"
             "sys.argv = ['vlsft', 'print-args', '--config', sys.argv[1], '--json']\n"
             "try:\n    runpy.run_module('vlsft', run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed', 'accelerate') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, env=cli_env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        run = subprocess.run([*VLSFT, "print-args", "--config", str(path), "--json"], capture_output=True, text=True,
                             env=cli_env, timeout=60)
        best = min(best, time.perf_counter() - start)
        assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["effective_batch_size"] == 256
    print(f"print-args wall time (best of 3): {best:.3f} s")
    assert best < 1.5  # target 0.25 s on an idle machine; the bound leaves room for a loaded CI box
    bad = subprocess.run([*VLSFT, "print-args", "--config", str(path), "training.lr=1"], capture_output=True,
                         text=True, env=cli_env, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert line.startswith("override 'training.lr=1': error: [training.lr] unknown key")


def test_secrets_never_printed(tmp_path, cli_env):
    """Unique secret values in the environment appear nowhere in text/JSON output or the saveable YAML."""
    aws, wandb = f"aws-{secrets.token_hex(16)}", f"wb-{secrets.token_hex(16)}"
    run_yaml = RUN_YAML + "wandb:\n  project: vl\nstorage:\n  secret_access_key: ${AWS_SECRET_ACCESS_KEY}\n"
    path = make_project(tmp_path, run_yaml=run_yaml)
    env = {**cli_env, "AWS_SECRET_ACCESS_KEY": aws, "WANDB_API_KEY": wandb}
    env.pop("WANDB_MODE")  # the environment's mode would beat the YAML's default (online with a project)
    outputs = []
    for extra in ([], ["--json"]):
        run = subprocess.run([*VLSFT, "print-args", "--config", str(path), *extra], capture_output=True, text=True,
                             env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        outputs += [run.stdout, run.stderr]
    assert "AWS_SECRET_ACCESS_KEY" in outputs[0] and "***" in outputs[0]
    assert json.loads(outputs[2])["env"]["AWS_SECRET_ACCESS_KEY"] == "***"
    assert json.loads(outputs[2])["env"]["WANDB_API_KEY"] == "***"
    saved = os.environ.copy()
    try:
        os.environ.update(AWS_SECRET_ACCESS_KEY=aws, WANDB_API_KEY=wandb)
        plan = plan_from_file(path)
        assert plan.env["AWS_SECRET_ACCESS_KEY"] == aws  # the real value reaches the launch env
        outputs += [plan.config.to_saveable_yaml(), json.dumps(plan.to_json()), repr(plan.display_env()),
                    " ".join(plan.torchrun)]
    finally:
        os.environ.clear()
        os.environ.update(saved)
    for text in outputs:
        assert aws not in text and wandb not in text


def test_help_lists_the_command():
    result = CliRunner().invoke(app, ["print-args", "--help"])
    assert result.exit_code == 0 and "--config" in result.output and "KEY=VALUE" in result.output


def test_round2_lazy_cli_help_lists_every_command_and_print_args_loads_only_its_module(tmp_path, cli_env):
    path = make_project(tmp_path)
    probe = ("import sys\nsys.argv = ['vlsft'] + sys.argv[1:]\nfrom vlsft.cli import main\n"
             "try:\n    main()\nexcept SystemExit as e:\n    code = e.code or 0\nelse:\n    code = 0\n"
             "loaded = sorted(m for m in sys.modules if m.startswith(('rich', 'typer', 'vlsft.cmd_')))\n"
             "sys.stderr.write('LOADED %s %s\\n' % (code, loaded))\n")
    run = subprocess.run([sys.executable, "-c", probe, "print-args", "--config", str(path), "--json",
                          "training.report_to=wandb"], capture_output=True, text=True, env=cli_env, timeout=60)
    # a plain print-args command line runs without Typer (vlsft.print_args.fast_main): no command module at all
    assert run.stderr.strip().splitlines()[-1] == "LOADED 0 []", run.stderr
    doc = json.loads(run.stdout)  # still one JSON document when there are warnings
    assert any("W&B is disabled" in w for w in doc["warnings"])
    for argv, words in ((["--help"], ("print-args", "train", "datasets")), (["datasets", "--help"],
                        ("check", "use", "preview"))):
        run = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=cli_env,
                             timeout=60)
        assert "LOADED 0" in run.stderr and all(w in run.stdout for w in words), (run.stdout, run.stderr)

"""print-args names the chat template the samples are rendered as and, per dataset, what it does with thinking
(issue 22 item 4): detected from the model folder, model.chat_template for a folder vlsft does not recognise."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from qwenvl.templates import CHAT_TEMPLATES
from vlsft.cli import app

CACHE = Path(__file__).resolve().parents[1] / ".cache"


def _project(tmp_path: Path, template: str | None) -> Path:
    """A run YAML on a tiny Qwen3.5 model whose chat_template.jinja is ``template`` (None: the Qwen3.5 one)."""
    from qwenvl.tiny import ensure_tiny_model

    base = ensure_tiny_model(CACHE / "tiny-qwen3_5", family="qwen3_5")
    model = tmp_path / "model"
    model.mkdir()
    for f in base.iterdir():
        (model / f.name).symlink_to(f) if f.name != "chat_template.jinja" else shutil.copyfile(f, model / f.name)
    if template is not None:
        (model / "chat_template.jinja").write_text(template, encoding="utf-8")
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>a"}]}
    (tmp_path / "t.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "d.json").write_text(json.dumps({
        "think": {"annotation_path": "t.jsonl", "thinking_loss": "mask", "reasoning_effort": "low"},
        "plain": {"annotation_path": "t.jsonl"}}))
    (tmp_path / "run.yaml").write_text(f"model: {{name_or_path: {model}, tune_mm_llm: true}}\n"
                                       "data: {dictionary: d.json, use: [think, plain], model_max_length: 1024}\n"
                                       "training: {max_steps: 2}\ndistributed: {nproc_per_node: 1}\n"
                                       f"output: {{dir: {tmp_path / 'out'}}}\n")
    return tmp_path / "run.yaml"


def _print_args(cfg: Path, *extra: str):
    return CliRunner().invoke(app, ["print-args", "--config", str(cfg), *extra])


def _chat_lines(output: str) -> list[str]:
    return [x.split("chat: ", 1)[1] for x in output.splitlines() if x.lstrip("# ").startswith("chat: ")]


def test_the_folder_template_is_named_and_each_dataset_says_what_it_does(tmp_path):
    cfg = _project(tmp_path, None)
    r = _print_args(cfg)
    assert r.exit_code == 0, r.output
    assert "# Chat template: Qwen3.5, samples rendered as it renders them (the model folder's chat template, the " \
           "published text)" in r.output
    assert _chat_lines(r.output) == [
        "Qwen3.5 chat template, earlier turns' thinking dropped, thinking masked, reasoning_effort low unused (the "
        "template has none)",
        "Qwen3.5 chat template, earlier turns' thinking dropped, thinking trained"]
    doc = json.loads(_print_args(cfg, "--json").output)
    assert doc["chat"]["template"] == "qwen3.5" and set(doc["chat"]["datasets"]) == {"think", "plain"}


def test_a_qwen38_folder_keeps_history_and_names_the_effort(tmp_path):
    r = _print_args(_project(tmp_path, CHAT_TEMPLATES["qwen3.8"]))
    assert r.exit_code == 0, r.output
    assert _chat_lines(r.output) == [
        "Qwen3.8 chat template, earlier turns' thinking kept, thinking masked, reasoning_effort low",
        "Qwen3.8 chat template, earlier turns' thinking kept, thinking trained, reasoning_effort xhigh (the default)"]


def test_an_unknown_template_warns_and_model_chat_template_overrides_it(tmp_path):
    cfg = _project(tmp_path, "{{ messages }}")
    r = _print_args(cfg)
    assert r.exit_code == 0, r.output
    assert "its chat template is not one vlsft knows" in r.output and "set model.chat_template (qwen3.5, qwen3.6, " \
           "qwen3.8)" in r.output
    assert _chat_lines(r.output)[1].startswith("Qwen3.5 chat template")
    r = _print_args(cfg, "model.chat_template=qwen3.6")
    assert r.exit_code == 0 and "not one vlsft knows" not in r.output, r.output
    assert "--chat_template qwen3.6" in r.output.replace("\\\n", " ")
    assert "# Chat template: Qwen3.6, samples rendered as it renders them (model.chat_template)" in r.output
    r = _print_args(cfg, "model.chat_template=qwen3-vl")
    assert r.exit_code == 2
    assert "model.chat_template 'qwen3-vl' is not a chat template Qwen3.5 can be trained with" in r.output


def test_the_qwen38_recipe_plans_with_its_template(tmp_path):
    from qwenvl.templates import CHAT_TEMPLATES as T
    from vlsft.plan import plan_from_file

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_5"}')
    (tmp_path / "chat_template.jinja").write_text(T["qwen3.8"], encoding="utf-8")
    plan = plan_from_file(repo / "configs" / "qwen3.8-27b.yaml", [
        f"data.dictionary={repo / 'configs' / 'demo' / 'Dataset-Dictionary.json'}", f"model.name_or_path={tmp_path}",
        f"output.dir={tmp_path / 'out'}"], {})
    args = dict(zip(plan.trainer_args[::2], plan.trainer_args[1::2], strict=True))
    assert args["--chat_template"] == "qwen3.8" and args["--data_packing"] == "True"
    assert plan.chat["template"] == "qwen3.8" and plan.effective_batch_size == 128
    assert all("earlier turns' thinking kept" in line for line in plan.chat["datasets"].values())

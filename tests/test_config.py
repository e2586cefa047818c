"""Run YAML validation: line-numbered errors, did-you-mean, batch solving, overrides, secrets."""

from __future__ import annotations

import dataclasses
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwenvl.problems import ProblemsError
from vlsft.config import LR_SCHEDULER_TYPES, SECTIONS, RunConfig, load_run_config

BASE = """\
model:
  name_or_path: /models/qwen
  tune_mm_mlp: true
  tune_mm_llm: true
data:
  dictionary: dict.json
training:
  learning_rate: 2e-5
  per_device_train_batch_size: 4
  gradient_accumulation_steps: 4
distributed:
  nproc_per_node: 8
  nnodes: 2
output:
  dir: out
"""


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(path, overrides=()) -> list[str]:
    with pytest.raises(ProblemsError) as info:
        load_run_config(path, overrides)
    return [p.render() for p in info.value.problems]


def test_valid_file_loads_with_typed_values(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE))
    assert cfg.training.learning_rate == 2e-5  # YAML 1.1 would read "2e-5" as a string
    assert isinstance(cfg.training.learning_rate, float)
    assert cfg.training.gradient_accumulation_steps == 4
    assert cfg.world_size == 16
    assert cfg.base_dir == tmp_path.resolve()
    assert cfg.distributed.deepspeed == "zero3"


def test_typo_reports_line_column_and_suggestion(tmp_path):
    path = write(tmp_path, BASE.replace("  learning_rate: 2e-5", "  learnig_rate: 2e-5"))
    lines = problems_of(path)
    assert lines == [f"{path}:8:3: error: [training.learnig_rate] unknown key (hint: did you mean 'learning_rate'?)"]


def test_all_problems_reported_sorted_by_line(tmp_path):
    text = BASE.replace("  tune_mm_mlp: true", "  tune_mm_mlp: maybe").replace("  nnodes: 2", "  nnode: 2")
    text += "wandb:\n  mode: loud\nbogus: 1\n"
    path = write(tmp_path, text)
    lines = problems_of(path)
    assert len(lines) == 4, lines
    assert lines[0].startswith(f"{path}:3:16: error: [model.tune_mm_mlp]")
    assert lines[1] == f"{path}:13:3: error: [distributed.nnode] unknown key (hint: did you mean 'nnodes'?)"
    assert lines[2].startswith(f"{path}:17:9: error: [wandb.mode] Input should be 'online', 'offline' or 'disabled'")
    assert lines[3].startswith(f"{path}:18:1: error: [bogus] unknown key")


def test_missing_required_keys_and_sections(tmp_path):
    path = write(tmp_path, "model:\n  tune_mm_llm: true\ndata:\n  dictionary: d.json\n")
    lines = problems_of(path)
    assert any(line.startswith(f"{path}:1:1: error: [model.name_or_path] missing required key") for line in lines)
    assert any("[output] missing required key" in line for line in lines)


def test_yaml_syntax_error_and_duplicates(tmp_path):
    lines = problems_of(write(tmp_path, "model:\n  name_or_path: [unclosed\ndata: {}\n", "bad.yaml"))
    assert len(lines) == 1 and "YAML syntax error" in lines[0] and ":3:" in lines[0]
    dup = BASE + "output:\n  dir: other\n"
    lines = problems_of(write(tmp_path, dup, "dup.yaml"))
    assert any("[output] duplicate key (first defined on line 14)" in line and ":16:1:" in line for line in lines)
    assert problems_of(write(tmp_path, "", "empty.yaml"))[0].endswith(
        "empty.yaml:1:1: error: the file is empty (no sections) (hint: start from a copy of configs/qwen2.5-vl-7b.yaml)")
    assert "top level must be a mapping" in problems_of(write(tmp_path, "- a\n", "list.yaml"))[0]


def test_global_batch_solved_into_accumulation(tmp_path):
    text = BASE.replace("  gradient_accumulation_steps: 4\n", "  global_batch_size: 256\n")
    cfg = load_run_config(write(tmp_path, text))
    assert cfg.training.gradient_accumulation_steps == 4  # 256 / (4 x 8 x 2)


def test_global_batch_not_divisible(tmp_path):
    text = BASE.replace("  gradient_accumulation_steps: 4\n", "  global_batch_size: 200\n")
    path = write(tmp_path, text)
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:10:22: error: [training.global_batch_size] global_batch_size 200 is not a "
                           "multiple of 4 per device x 8 per node x 2 node(s) = 64")
    assert "use 192 or 256" in line


def test_global_batch_contradicts_accumulation(tmp_path):
    path = write(tmp_path, BASE + "")
    lines = problems_of(path, ["training.global_batch_size=128"])
    assert len(lines) == 1 and "gradient_accumulation_steps 4 contradicts global_batch_size 128" in lines[0]
    assert lines[0].startswith(f"{path}:10:32:")
    # consistent values are fine
    assert load_run_config(path, ["training.global_batch_size=256"]).training.gradient_accumulation_steps == 4


def test_accumulation_defaults_to_one(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE.replace("  gradient_accumulation_steps: 4\n", "")))
    assert cfg.training.gradient_accumulation_steps == 1


def test_overrides_are_yaml_typed(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_run_config(path, [
        "training.learning_rate=1e-5", "model.tune_mm_vision=true", "data.use=[a%50, b]",
        "output.run_name=123", "training.extra.adam_beta2=0.95", "distributed.node_rank=1",
        "data.dictionary=other.json", "wandb.project=", "data.use=c%12.5,d",
    ])
    assert cfg.training.learning_rate == 1e-5
    assert cfg.model.tune_mm_vision is True
    assert cfg.output.run_name == "123"
    assert cfg.training.extra == {"adam_beta2": 0.95}
    assert cfg.distributed.node_rank == 1
    assert cfg.data.dictionary == "other.json"
    assert cfg.wandb.project is None
    assert cfg.data.use == ["c%12.5", "d"]  # the later override wins; a comma string is split


def test_override_errors(tmp_path):
    path = write(tmp_path, BASE)
    lines = problems_of(path, ["training.learnig_rate=1e-5", "nonsense", "training.per_device_train_batch_size=x",
                               "model.name_or_path.sub=1", "traning.seed=3"])
    assert ("override 'training.learnig_rate=1e-5': error: [training.learnig_rate] unknown key "
            "(hint: did you mean 'training.learning_rate'?)") in lines
    assert "override 'nonsense': error: expected KEY=VALUE (hint: e.g. training.learning_rate=2e-5)" in lines
    assert any(line.startswith("override 'training.per_device_train_batch_size=x': error: "
                               "[training.per_device_train_batch_size] Input should be a valid integer") for line in lines)
    assert any("'model.name_or_path' has no sub-keys" in line for line in lines)
    assert any("[traning.seed] unknown key (hint: did you mean 'training.seed'?)" in line for line in lines)


def test_literal_secret_rejected_without_echo(tmp_path):
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    path = write(tmp_path, BASE + f"storage:\n  secret_access_key: {secret}\n  access_key_id: '${{MY_KEY}}'\n")
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:17:22: error: [storage.secret_access_key] a literal secret is not allowed")
    assert "${ENV_VAR}" in line and secret not in line
    lines = problems_of(path, [f"storage.session_token={secret}x"])
    assert all(secret not in line for line in lines)
    ok = load_run_config(write(tmp_path, BASE + "storage:\n  secret_access_key: ${S}\n", "ok.yaml"))
    assert ok.storage.secret_access_key == "${S}"


def test_extra_names_checked_against_training_arguments(tmp_path):
    text = BASE.replace("distributed:\n", "  extra:\n    optim: adamw_torch_fused\n    adam_beta3: 0.9\n"
                                         "    output_dir: x\ndistributed:\n")
    path = write(tmp_path, text)
    lines = problems_of(path)
    assert any(":13:5: error: [training.extra.adam_beta3] not a transformers.TrainingArguments name "
               "(hint: did you mean 'adam_beta" in line for line in lines), lines
    assert any("[training.extra.output_dir] set by its own run YAML key (hint: use output.dir)" in line for line in lines)
    assert len(lines) == 2
    token = problems_of(write(tmp_path, BASE, "t.yaml"), ["training.extra.hub_token=hf_abc123"])
    assert len(token) == 1 and "(hint: export HF_TOKEN instead)" in token[0] and "hf_abc123" not in token[0]


def test_data_use_entries_validated(tmp_path):
    path = write(tmp_path, BASE.replace("  dictionary: dict.json\n", "  dictionary: dict.json\n  use: [a%50, 'b%x']\n"))
    (line,) = problems_of(path)
    assert line.startswith(f"{path}:7:15: error: [data.use[1]] cannot parse 'b%x'")


def test_scheduler_names_and_every_field_described():
    from transformers.trainer_utils import SchedulerType

    assert set(LR_SCHEDULER_TYPES) == {s.value for s in SchedulerType}
    for section, model in [("", RunConfig), *SECTIONS.items()]:
        for name, info in model.model_fields.items():
            assert info.description, f"{section}.{name} has no description"


def test_training_argument_names_match_transformers():
    """The static table (so print-args never imports transformers) equals transformers' own fields."""
    import transformers

    from vlsft.training_args import LIST_ARGUMENT_NAMES, TRAINING_ARGUMENT_NAMES

    parser = transformers.HfArgumentParser(transformers.TrainingArguments)
    assert LIST_ARGUMENT_NAMES == {a.dest for a in parser._actions if a.nargs in ("+", "*")}
    real = {f.name for f in dataclasses.fields(transformers.TrainingArguments) if f.init}
    assert TRAINING_ARGUMENT_NAMES == real, (
        f"regenerate src/vlsft/training_args.py for transformers {transformers.__version__}: "
        f"missing {sorted(real - TRAINING_ARGUMENT_NAMES)}, stale {sorted(TRAINING_ARGUMENT_NAMES - real)}")


def test_saveable_yaml_round_trips(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE + "storage:\n  secret_access_key: ${S}\n"))
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_saveable_yaml())
    assert load_run_config(again).model_dump() == cfg.model_dump()


def test_config_reference_is_current(repo_root):
    """docs/run-yaml.md's key tables are generated from the models: rerun scripts/gen_config_docs.py when this fails."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config_docs", repo_root / "scripts" / "gen_config_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (repo_root / "docs" / "run-yaml.md").read_text(encoding="utf-8")
    assert gen.updated_doc(text) == text, "run: python scripts/gen_config_docs.py"
    for section, model in SECTIONS.items():
        for name in model.model_fields:  # a nested section (model.lora) is documented key by key
            assert f"| `{section}.{name}` |" in text or f"| `{section}.{name}." in text, f"{section}.{name}"


def test_readme_quick_start_and_override_examples(repo_root, tmp_path):
    import re
    import shlex

    text = (repo_root / "README.md").read_text(encoding="utf-8")
    quick = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in quick.strip().splitlines()] == ["make demo", "make test"]
    # every KEY=VALUE override shown with print-args/train in the README is a valid override
    path = write(tmp_path, BASE)
    checked = 0
    for line in re.findall(r"^vlsft (?:print-args|train) --config \S+ (.+)$", text, flags=re.M):
        overrides = [t for t in shlex.split(line.split(" #")[0]) if "=" in t and not t.startswith("-")]
        if overrides:
            load_run_config(path, overrides)
            checked += 1
    assert checked >= 2


_KEYS = st.sampled_from([*SECTIONS, *(n for m in SECTIONS.values() for n in m.model_fields), "extra", "x", "1", ""])
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12), st.sampled_from(["${A}", "zero3", "auto", "2e-5", "a%50"]))
_TREES = st.recursive(_SCALARS, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_KEYS, kids, max_size=6),
                      max_leaves=25)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=st.dictionaries(_KEYS, _TREES, max_size=8), junk=st.text(max_size=40), use_junk=st.booleans())
def test_malformed_yaml_never_crashes(tmp_path, tree, junk, use_junk):
    """Any document gives a RunConfig or a ProblemsError whose problems all render to one line."""
    import yaml

    path = tmp_path / "fuzz.yaml"
    path.write_text(junk if use_junk else yaml.safe_dump(tree))
    try:
        load_run_config(path, ["training.extra.x=1"] if not use_junk else [])
    except ProblemsError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert "\n" not in problem.render()


_OVERRIDE_KEYS = st.sampled_from([f"{s}.{n}" for s, m in SECTIONS.items() for n in m.model_fields]
                                 + ["training.extra.optim", "training.extra.a.b", "model", "x.y", "=", ""])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(_OVERRIDE_KEYS, st.text(max_size=15) | st.sampled_from(["[a, b]", "{x: 1}", "null",
                                                                                           "1e9", "-1", "'"])),
                      max_size=4))
def test_random_overrides_never_crash(tmp_path, pairs):
    path = tmp_path / "run.yaml"
    path.write_text(BASE)
    try:
        load_run_config(path, [f"{k}={v}" for k, v in pairs])
    except ProblemsError as exc:
        assert exc.problems and all("\n" not in p.render() for p in exc.problems)


# ------------------------------------------------------------------ round 2: inputs users actually write

HEAD = "model: {name_or_path: /m}\ndata: {dictionary: d.json}\noutput: {dir: out}\n"


@pytest.mark.parametrize("section, want", [
    ("training: {learning_rate: true}", ":4:27: error: [training.learning_rate] expected a number, got true"),
    ("training: {num_train_epochs: yes}", ":4:30: error: [training.num_train_epochs] expected a number, got true"),
    ("training: {per_device_train_batch_size: off}", "expected a number, got false"),
    ("distributed: {nproc_per_node: on}", "[distributed.nproc_per_node] expected a number, got true"),
    ("training: {per_device_train_batch_size: 0}",
     "[training.per_device_train_batch_size] Input should be greater than or equal to 1, got 0 (hint: "
     "per_device_train_batch_size: samples per GPU"),
    ("training: {learning_rate: abc}", "got 'abc' (hint: write a number, e.g. 2.0e-5"),
    ("training: {bf16: maybe}", "got 'maybe' (hint: write true or false)"),
    ("training: {extra: [optim]}", "got a list (hint: write a mapping, e.g. extra: {optim: adamw_torch_fused})"),
    ("wandb: {mode: onlin}", "[wandb.mode] Input should be 'online', 'offline' or 'disabled', got 'onlin' "
     "(hint: did you mean 'online'?)"),
    ("distributed: {master_port: 70000}", "less than or equal to 65535, got 70000"),
    ("distributed: {rdzv_endpoint: node01}", "[distributed.rdzv_endpoint] rdzv_endpoint 'node01' must be host:port"),
    ("distributed: {rdzv_endpoint: 'node01:99999'}", "must be host:port with a port from 1 to 65535"),
    ("output: {dir: out, resume: false}", "resume must be auto, never or a checkpoint path, got false"),
    ("data: {dictionary: d.json, use: [a, b%50, a%20]}",
     "[data.use[2]] dataset 'a' is listed twice (also item 0) (hint: list it once; for more copies write a "
     "percent above 100, e.g. a%200)"),
    ("storage: {secret_access_key: $MY_SECRET}", 'write the reference as "${MY_SECRET}" (with braces, quoted)'),
    ("storage: {session_token: '${TOK:-s3cr3t}'}", 'a default value in a secret reference would be a literal'),
    ("distributed: {deepspeed: true}", "true is not a DeepSpeed configuration"),
])
def test_round2_bad_values_one_line_with_location_and_hint(tmp_path, section, want):
    kept = [line for line in HEAD.splitlines() if line.split(":")[0] != section.split(":")[0]]
    path = write(tmp_path, "\n".join(kept + [section] + ["wandb: {}"] * (4 - len(kept) - 1)) + "\n")
    lines = problems_of(path)
    assert len(lines) == 1 and lines[0].startswith(f"{path}:{len(kept) + 1}:") and want in lines[0], lines
    assert "s3cr3t" not in lines[0]


def test_round2_friendly_spellings_accepted(tmp_path):
    path = write(tmp_path, "model: {name_or_path: /m}\ndata: {dictionary: d.json}\n"
                 "output: {dir: out, resume: Never}\ndistributed: {deepspeed: }\n"
                 "training: {learning_rate: '2e-5', bf16: yes, num_train_epochs: .5}\n")
    cfg = load_run_config(path)
    assert cfg.output.resume == "never" and cfg.distributed.deepspeed == "none"
    assert cfg.training.learning_rate == 2e-5 and cfg.training.bf16 is True and cfg.training.num_train_epochs == 0.5
    assert load_run_config(path, ["distributed.deepspeed=false"]).distributed.deepspeed == "none"
    assert load_run_config(path, ["distributed.master_addr= "]).distributed.master_addr is None


def test_round2_file_level_problems_have_a_location(tmp_path):
    assert problems_of(write(tmp_path, "", "e.yaml"))[0].startswith(f"{tmp_path}/e.yaml:1:1: error:")
    assert problems_of(write(tmp_path, "- a\n- b\n", "l.yaml"))[0].startswith(f"{tmp_path}/l.yaml:1:1: error:")
    tabs = problems_of(write(tmp_path, "model:\n\tname_or_path: x\n", "t.yaml"))
    assert tabs[0].startswith(f"{tmp_path}/t.yaml:2:1: error: YAML syntax error") and "never tabs" in tabs[0]
    lines = problems_of(write(tmp_path, HEAD + "traning: {learning_rate: 1e-5}\n", "s.yaml"))
    assert lines == [f"{tmp_path}/s.yaml:4:1: error: [traning] unknown key (hint: did you mean 'training'?)"]
    missing = problems_of(write(tmp_path, "model: {name_or_path: /m}\ndata: {dictionary: d.json}\n", "m.yaml"))
    assert missing == [f"{tmp_path}/m.yaml:1:1: error: [output] missing required key (hint: add an output section, "
                       "e.g. output: {dir: runs/my-first-run} (a new folder for every fresh run))"]


def test_round2_extra_lists_only_for_list_arguments(tmp_path):
    lines = problems_of(write(tmp_path, HEAD + "training: {extra: {optim: [adamw_torch], label_names: [[x]]}}\n"))
    assert any("[training.extra.optim] takes one value, not a list" in x and ":4:" in x for x in lines), lines
    assert any("[training.extra.label_names] list items must be plain values" in x for x in lines), lines


def test_round2_text_overrides_stay_text_and_epochs(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_run_config(path, ["output.run_name=no", "wandb.project=1e5", "model.name_or_path=~/m",
                                 "output.resume='never'", "wandb.entity=null"])
    assert (cfg.output.run_name, cfg.wandb.project, cfg.model.name_or_path) == ("no", "1e5", "~/m")
    assert cfg.output.resume == "never" and cfg.wandb.entity is None
    lines = problems_of(write(tmp_path, HEAD + "wandb: {project: off}\n", "b.yaml"))
    assert "[wandb.project] expected text, got the boolean false" in lines[0] and ":4:18:" in lines[0]
    assert load_run_config(path, ["training.num_train_epochs=0", "training.max_steps=10"]).training.max_steps == 10
    (line,) = problems_of(path, ["training.num_train_epochs=0"])
    assert "nothing to train: num_train_epochs is 0 and max_steps is not set" in line
    (line,) = problems_of(path, ["training.save_steps=.inf"])
    assert "[training.save_steps] Input should be a finite number, got inf" in line


def test_round2_empty_sections_and_section_overrides(tmp_path):
    cfg = load_run_config(write(tmp_path, BASE + "wandb:\nstorage:\n", "e.yaml"), [])
    assert cfg.wandb.effective_mode == "disabled" and cfg.training.extra == {}
    (line,) = problems_of(write(tmp_path, HEAD.replace("output: {dir: out}", "output:"), "o.yaml"))
    assert line.endswith(":3:1: error: [output.dir] missing required key (hint: add dir: runs/my-first-run "
                         "(a new folder for every fresh run))")
    (line,) = problems_of(write(tmp_path, BASE), ["training=1"])
    assert line.startswith("override 'training=1': error: [training] 'training' is a section: set one key at a time")


def test_round2_data_use_spellings(tmp_path):
    path = write(tmp_path, BASE)
    assert load_run_config(path, ["data.use={docs: 50, charts: null}"]).data.use == ["docs%50", "charts"]
    assert load_run_config(path, ["data.use=[' docs ', charts%250]"]).data.use == ["docs", "charts%250"]
    assert load_run_config(path, ["data.use=docs%50, charts"]).data.use == ["docs%50", "charts"]


def test_round2_anchors_alias_bomb_encoding_and_documents(tmp_path):
    anchored = ("x-common: &c {learning_rate: 1.0e-5, per_device_train_batch_size: 2}\n" + HEAD
                + "training:\n  <<: *c\n  learning_rate: 3.0e-5\n")
    cfg = load_run_config(write(tmp_path, anchored, "a.yaml"))
    assert (cfg.training.learning_rate, cfg.training.per_device_train_batch_size) == (3e-5, 2)
    rows = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]  # 9^10 leaves if walked
    start = time.perf_counter()
    lines = problems_of(write(tmp_path, "\n".join(rows) + "\n", "bomb.yaml"))
    assert time.perf_counter() - start < 5  # 1 root + 10 keys + values v0 = 10, v_i = 1 + 9 v_(i-1): 4,412,961,516
    assert lines == [f"{tmp_path}/bomb.yaml:1:1: error: aliases expand to 4,412,961,516 values (limit 100,000) "
                     "(hint: a run YAML needs no nested aliases of aliases; write the values out)"]
    (tmp_path / "latin.yaml").write_bytes(b"model: {name_or_path: /m}\noutput: {dir: caf\xe9}\n")
    assert problems_of(tmp_path / "latin.yaml") == [
        f"{tmp_path}/latin.yaml:2: error: not UTF-8 text (byte 0xe9) (hint: save the file as UTF-8)"]
    (line,) = problems_of(write(tmp_path, HEAD + "---\nmodel: {}\n", "two.yaml"))
    assert ":4:1: error: YAML syntax error" in line and "delete the '---' line" in line
    (line,) = problems_of(tmp_path)
    assert line == f"{tmp_path}: error: is a folder, not a run YAML (hint: pass the .yaml file, e.g. " \
                   "configs/qwen2.5-vl-7b.yaml)"


def test_round2_extra_override_depth(tmp_path):
    path = write(tmp_path, BASE)
    (line,) = problems_of(path, ["training.extra.lr_scheduler_kwargs.min_lr=1e-6"])
    assert "training.extra takes one level: training.extra.NAME=value" in line
    cfg = load_run_config(path, ["training.extra.lr_scheduler_kwargs={min_lr: 1e-6}"])
    assert cfg.training.extra == {"lr_scheduler_kwargs": {"min_lr": 1e-6}}


def test_round2_dotted_key_in_file(tmp_path):
    (line,) = problems_of(write(tmp_path, HEAD + "training.learning_rate: 1.0e-5\n"))
    assert line.endswith(":4:1: error: [training.learning_rate] unknown key (hint: dotted keys are for the command "
                         "line; in the file nest it: training: {learning_rate: ...})")


def test_round2_report_to_list(tmp_path):
    path = write(tmp_path, BASE)
    assert load_run_config(path, ["training.report_to=[tensorboard]"]).training.report_to == "tensorboard"
    (line,) = problems_of(path, ["training.report_to=[wandb, tensorboard]"])
    assert "[training.report_to] transformers takes one --report_to name" in line


def test_a_pipe_as_the_run_yaml_or_dictionary_is_one_line_not_a_hang(tmp_path):
    """A FIFO given as --config or as the dictionary: open() would block forever."""
    import os

    from cli_inprocess import vlsft

    for name in ("run.yaml", "dict.json"):
        os.mkfifo(tmp_path / name)
    with pytest.raises(ProblemsError, match="is not a regular file"):
        load_run_config(tmp_path / "run.yaml")
    r = vlsft("datasets", "check", str(tmp_path / "dict.json"))
    assert r.returncode == 2 and "is not a regular file (a pipe, socket or device)" in r.stdout + r.stderr
    os.mkfifo(tmp_path / "a.jsonl")  # an annotation file that is a pipe
    (tmp_path / "d.json").write_text('{"x": {"annotation_path": "a.jsonl"}}')
    r = vlsft("datasets", "check", "--deep", str(tmp_path / "d.json"))
    assert r.returncode == 1 and "annotation file of dataset 'x' is not a regular file" in r.stdout + r.stderr

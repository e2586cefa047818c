"""LLaMA-Factory ``hf_hub_url`` datasets (issue 23 item 1), against a hub served on loopback (tests/hub_server.py):
read from the standard Hugging Face cache by check / print-args (never downloaded there), downloaded by what
``vlsft train`` runs before its plan, a subset / folder narrowed as LLaMA-Factory narrows it, and the catalogue's
entries a run does not use never blocking it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pq = pytest.importorskip("pyarrow.parquet")

from cli_inprocess import vlsft  # noqa: E402
from hub_server import LoopbackHub  # noqa: E402
from plan_fixtures import make_project  # noqa: E402
from test_hf_datasets import _rows, _table  # noqa: E402

from qwenvl import hub as H  # noqa: E402

REPO_ID = "vlsft-test/llava-mini"
LF_ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    for subset, (n, start) in {"en": (6, 0), "zh": (4, 50)}.items():
        (repo / subset).mkdir()
        pq.write_table(_table(_rows(n, start)), repo / subset / "train-00000-of-00001.parquet")
    pq.write_table(_table(_rows(2, 90)), repo / "en" / "test-00000-of-00001.parquet")  # another split: not read
    (repo / "README.md").write_text("---\nlicense: mit\n---\n")
    with LoopbackHub() as server:
        server.add(REPO_ID, repo, repo_type="dataset")
        yield server


@pytest.fixture()
def env(hub, tmp_path, monkeypatch):
    """The process's environment (the dictionary reads os.environ) pointing at an empty cache and the hub."""
    for name in list(__import__("os").environ):
        if name.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE")):
            monkeypatch.delenv(name)
    values = {"HF_HOME": str(tmp_path / "hf-home"), "HF_ENDPOINT": hub.url, "NO_PROXY": "127.0.0.1,localhost",
              "no_proxy": "127.0.0.1,localhost"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return dict(__import__("os").environ)


def _info(folder: Path, **hub_entry) -> Path:
    (folder / "local.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                                 {"role": "assistant", "content": "Hello."}]}) + "\n")
    info = {"local": {"file_name": "local.jsonl", **LF_ENTRY},
            "mini": {"hf_hub_url": REPO_ID, **LF_ENTRY, **hub_entry},
            "elsewhere": {"ms_hub_url": "AI-ModelScope/other", **LF_ENTRY}}
    path = folder / "dataset_info.json"
    path.write_text(json.dumps(info, indent=1))
    return path


def test_check_reads_the_cache_and_never_downloads(hub, env, tmp_path):
    path = _info(tmp_path, subset="en")
    before = len(hub.requests)
    r = vlsft("datasets", "check", str(path))
    assert r.returncode == 1 and len(hub.requests) == before  # nothing asked of the hub
    errors = [line for line in (r.stdout + r.stderr).splitlines() if ": error: " in line]
    assert len(errors) == 2, errors
    assert f"dataset 'mini': hf_hub_url {REPO_ID} is not in the Hugging Face cache {tmp_path / 'hf-home' / 'hub'}" \
        in errors[0] and f"hf download {REPO_ID} --repo-type dataset" in errors[0]
    assert "'ms_hub_url'" in errors[1]

    from qwenvl.data import hub_datasets

    said: list[str] = []
    hub_datasets.fetch(hub_datasets.used_entries(str(path), ["mini%50"]), env, said.append)
    folder = H.locate(REPO_ID, None, env, repo_type="dataset").folder
    assert said[-1] == f"# dataset mini: {REPO_ID} is in {folder}"
    assert sorted(p.name for p in Path(folder).rglob("*.parquet")) == ["test-00000-of-00001.parquet",
                                                                       "train-00000-of-00001.parquet",
                                                                       "train-00000-of-00001.parquet"]
    r = vlsft("datasets", "check", str(path), "--deep", "--json")
    report = json.loads(r.stdout)
    mini = next(d for d in report["datasets"] if d["name"] == "mini")
    assert mini["actual_length"] == 6 and mini["images"] == 4 and mini["text_only"] == 2, mini  # en's train rows only
    # no subset: both configurations' train shards; a subset or folder that is not there: one line
    (tmp_path / "all").mkdir()
    r = vlsft("datasets", "check", str(_info(tmp_path / "all")), "--json")
    assert next(d for d in json.loads(r.stdout)["datasets"] if d["name"] == "mini")["actual_length"] == 10
    (tmp_path / "bad").mkdir()
    r = vlsft("datasets", "check", str(_info(tmp_path / "bad", subset="fr")))
    assert f"hf_hub_url {REPO_ID}: subset 'fr' is not a folder of the repository" in r.stdout + r.stderr


def test_a_run_uses_what_it_names_and_downloads_it_first(hub, env, tmp_path):
    """What `vlsft train` does before its plan: the used hub dataset downloaded, the plan counting its rows; the
    catalogue's unreadable entries that data.use does not name are one warning, not an error."""
    from qwenvl.problems import ProblemsError
    from vlsft.cmd_train import fetch_hub_datasets
    from vlsft.config import load_run_config
    from vlsft.plan import build_plan

    yaml_path = make_project(tmp_path)
    _info(tmp_path / "data", subset="zh")
    args = ["data.dictionary=data/dataset_info.json", "data.use=[local]"]
    r = vlsft("print-args", "--config", str(yaml_path), *args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 dataset(s) of" in r.stdout and "that data.use does not name cannot be read by vlsft (elsewhere, " \
        "mini): not used" in r.stdout
    cfg = load_run_config(yaml_path, ["data.dictionary=data/dataset_info.json", "data.use=[mini, local]"])
    with pytest.raises(ProblemsError, match="is not in the Hugging Face cache"):  # planning downloads nothing
        build_plan(cfg, env)
    assert H.locate(REPO_ID, None, env, repo_type="dataset").folder is None
    fetch_hub_datasets(cfg, env)
    plan = build_plan(load_run_config(yaml_path, ["data.dictionary=data/dataset_info.json",
                                                  "data.use=[mini, local]"]), env)
    assert {s.name: s.samples for s in plan.datasets} == {"mini": 4, "local": 1}

"""A model folder with a broken or missing piece: `vlsft chat`, `predict`, `export` and `datasets preview` say so in
one line (exit 2, no traceback) before any model is loaded, and leave nothing behind.

* processor settings (``preprocessor_config.json`` / ``processor_config.json``) that are not JSON, not an object,
  or whose pixel numbers are not positive whole numbers or lack a bound (:func:`qwenvl.runpolicy.processor_settings`);
* no tokenizer files (chat / predict refuse before loading; predict creates ``--out`` only once the model loaded);
* ``vlsft-lora.json`` fields of the wrong type (export);
* preview: a corrupt ``tokenizer.json``, a broken processor file (was silently replaced by the defaults), a
  ``--model`` that does not exist or is a file.

Refusals before loading run in process (:mod:`cli_inprocess`); the cases that load the tiny model are marked slow.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DICT = REPO / "configs" / "demo" / "Dataset-Dictionary.json"

BAD_PROCESSORS = {  # preprocessor_config.json text -> what the one line says
    "garbage": "preprocessor_config.json:1:1 is not valid JSON",
    "[]": "preprocessor_config.json is not a JSON object",
    '{"image_processor": "x"}': "has image_processor 'x'",
    '{"size": {"longest_edge": "abc", "shortest_edge": 1}}': "size.longest_edge 'abc', not a positive whole number",
    '{"size": {"longest_edge": 100}}': "size without shortest_edge",
    '{"size": [1, 2]}': "has size [1, 2], not an object",
    '{"patch_size": "14"}': "patch_size '14', not a positive whole number",
}


def _vlsft(*args: str):
    from cli_inprocess import vlsft

    return vlsft(*(str(a) for a in args))


def _one_error_line(r, *needles: str, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _model_copy(src: Path, dst: Path, *, skip: tuple[str, ...] = (), replace: dict[str, str] | None = None) -> Path:
    """``dst``: ``src``'s files as symbolic links, without ``skip``, with ``replace`` (name -> text) written."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and f.name not in (replace or {}):
            (dst / f.name).symlink_to(f.resolve())
    for name, text in (replace or {}).items():
        (dst / name).write_text(text, encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir


# ---------------------------------------------------------------------------------------------------- processor
def test_processor_settings_problems(tmp_path):
    from qwenvl.runpolicy import processor_problem, processor_settings

    for k, (text, said) in enumerate(BAD_PROCESSORS.items()):
        d = tmp_path / f"m{k}"
        d.mkdir()
        (d / "preprocessor_config.json").write_text(text)
        problem = processor_problem(d)
        assert problem is not None and said in problem and str(d) in problem, (text, problem)
    ok = tmp_path / "ok"
    ok.mkdir()
    assert processor_settings(ok) == [] and processor_problem(ok) is None  # no processor saved: nothing to read
    (ok / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 12845056,
                                                             "patch_size": 14, "merge_size": 2, "size": None}))
    (ok / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"size": {"shortest_edge": 784, "longest_edge": 50176}}}))
    assert processor_problem(ok) is None
    from qwenvl.infer import saved_pixel_limits

    assert saved_pixel_limits(ok) == {"min_pixels": 784, "max_pixels": 50176}  # the nested settings


def test_chat_and_predict_refuse_broken_processor_settings_before_loading(tiny, tmp_path):
    for k, (text, said) in enumerate(BAD_PROCESSORS.items()):
        m = _model_copy(tiny, tmp_path / f"m{k}", replace={"preprocessor_config.json": text})
        _one_error_line(_vlsft("chat", m, "hi"), str(m / "preprocessor_config.json"), said, "re-save the processor")
        # both pixel limits given: the saved ones are not needed, the broken file is still refused before loading
        _one_error_line(_vlsft("chat", m, "--min-pixels", "3136", "--max-pixels", "12544", "hi"), said)
        out = tmp_path / f"p{k}.jsonl"
        _one_error_line(_vlsft("predict", m, "--dataset", "facts", "--dictionary", DEMO_DICT, "--out", out),
                        str(m / "preprocessor_config.json"), said)
        assert not out.exists()


def test_chat_and_predict_refuse_a_folder_without_tokenizer_before_loading(tiny, tmp_path):
    m = _model_copy(tiny, tmp_path / "notok", skip=("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                    "merges.txt"))
    _one_error_line(_vlsft("chat", m, "hi"), f"{m} has no tokenizer (tokenizer.json / tokenizer_config.json)",
                    "copy them from the base model")
    out = tmp_path / "p.jsonl"
    _one_error_line(_vlsft("predict", m, "--dataset", "facts", "--dictionary", DEMO_DICT, "--out", out),
                    "has no tokenizer")
    assert not out.exists()


@pytest.mark.slow
def test_predict_creates_out_only_after_the_model_loaded(tiny, tmp_path):
    """A tokenizer file that exists but cannot be read fails when the processor loads (after the weights): --out
    was created empty before; now nothing is left behind."""
    m = _model_copy(tiny, tmp_path / "badtok", replace={"tokenizer.json": '{"broken'})
    out = tmp_path / "sub" / "p.jsonl"
    _one_error_line(_vlsft("predict", m, "--dataset", "facts", "--dictionary", DEMO_DICT, "--out", out,
                           "--limit", "1"), "has no usable processor")
    assert not out.exists() and not out.parent.exists()


# ---------------------------------------------------------------------------------------------------- export
def _lora_folder(tiny: Path, d: Path, manifest: dict | None = None, **files: str) -> Path:
    """A LoRA folder export accepts: PEFT config, whole (tiny) adapter weights, vlsft-lora.json, tokenizer and
    processor settings; ``files`` (name -> text) replace or add files."""
    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(tiny),
                                                       "r": 2, "target_modules": ["q_proj"]}))
    header = json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, d / name)
    (d / "preprocessor_config.json").write_text('{"size": {"shortest_edge": 3136, "longest_edge": 12544}}')
    (d / "vlsft-lora.json").write_text(json.dumps(manifest or {"base_model": str(tiny),
                                                               "files": ["adapter_model.safetensors"]}))
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def test_export_refuses_broken_processor_settings_before_writing(tiny, tmp_path):
    from qwenvl.export import source_problem

    assert source_problem(_lora_folder(tiny, tmp_path / "good")) is None
    for k, (text, said) in enumerate(BAD_PROCESSORS.items()):
        for name in ("preprocessor_config.json", "processor_config.json"):
            src = _lora_folder(tiny, tmp_path / f"l{k}-{name}", **{name: text})
            out = tmp_path / f"e{k}-{name}"
            line = _one_error_line(_vlsft("export", src, "--out", out), f"cannot export {src}",
                                   str(src / name), said.replace("preprocessor_config.json", name))
            assert "nothing was written" in line
            assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_export_refuses_manifest_fields_of_the_wrong_type(tiny, tmp_path):
    files = ["adapter_model.safetensors"]
    cases = {
        "trained_in_full must be a list of part names": {"base_model": str(tiny), "files": files,
                                                         "trained_in_full": 5},
        "trained_in_full must be a list of part names (it is [1])": {"base_model": str(tiny), "files": files,
                                                                     "trained_in_full": [1]},
        "base_model must be the base model folder's path (it is 5)": {"base_model": 5, "files": files},
        "base_model must be the base model folder's path (it is ['a'])": {"base_model": ["a"], "files": files},
    }
    for k, (said, manifest) in enumerate(cases.items()):
        src = _lora_folder(tiny, tmp_path / f"l{k}", manifest)
        out = tmp_path / f"e{k}"
        _one_error_line(_vlsft("export", src, "--out", out), f"cannot export {src}", f"vlsft-lora.json: {said}")
        assert not out.exists()
    # a manifest without base_model: --base names it; a wrong --base is said to come from --base
    src = _lora_folder(tiny, tmp_path / "nobase", {"files": files})
    _one_error_line(_vlsft("export", src, "--out", tmp_path / "e-nobase", "--base", tmp_path / "nowhere"),
                    "(given by --base) is not a model folder")
    _one_error_line(_vlsft("export", src, "--out", tmp_path / "e-nobase"),
                    f"(recorded in {src / 'vlsft-lora.json'}) is not a model folder")
    assert not (tmp_path / "e-nobase").exists()


# ---------------------------------------------------------------------------------------------------- preview
def _preview(model, *args: str):
    return _vlsft("datasets", "preview", "--model", model, "--dictionary", DEMO_DICT, "--dataset", "facts",
                  "--index", "0", *args)


def test_preview_model_that_does_not_exist_or_is_a_file(tmp_path):
    _one_error_line(_preview(tmp_path / "nowhere"), f"model directory {tmp_path / 'nowhere'} does not exist",
                    "--model must be a local model")
    (tmp_path / "afile").write_text("x")
    _one_error_line(_preview(tmp_path / "afile"), f"model directory {tmp_path / 'afile'} is not a folder")
    (tmp_path / "empty").mkdir()
    _one_error_line(_preview(tmp_path / "empty"), "has no tokenizer")


def test_preview_refuses_broken_processor_settings(tiny, tmp_path):
    """--model: the run's pixel limits are read from its processor: a broken file is one line (was ignored: the
    default limits were shown, and training stops on the same folder)."""
    for k, (text, said) in enumerate(BAD_PROCESSORS.items()):
        m = _model_copy(tiny, tmp_path / f"m{k}", replace={"preprocessor_config.json": text})
        _one_error_line(_preview(m), str(m / "preprocessor_config.json"), said, "re-save the processor")


@pytest.mark.slow
def test_preview_refuses_a_corrupt_tokenizer(tiny, tmp_path):
    m = _model_copy(tiny, tmp_path / "badtok", replace={"tokenizer.json": '{"broken'})
    _one_error_line(_preview(m), f"{m} has no usable tokenizer", "copy tokenizer.json")
    _one_error_line(_preview(m, "--json"), "has no usable tokenizer")
    r = _preview(tiny)  # the folder it was copied from works
    assert r.returncode == 0 and "What is the capital of France?" in r.stdout, r.stderr


def test_preview_blames_a_broken_config_json_not_the_tokenizer(tiny, tmp_path):
    for k, (text, said) in enumerate({"{bad": "config.json: unreadable", "[]": "model_type None is not supported",
                                      '{"model_type": "llama"}': "model_type 'llama' is not supported"}.items()):
        m = _model_copy(tiny, tmp_path / f"m{k}", replace={"config.json": text})
        line = _one_error_line(_preview(m), str(m / said.split(":")[0]) if ":" in said else str(m), said)
        assert "tokenizer" not in line

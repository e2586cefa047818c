"""Training/inference parity for the Qwen3.5 / 3.6 / 3.8 chat templates (issue 22 item 3; tests/test_parity.py does
the same for the Qwen2.5-era families): the prompt ``vlsft chat`` / ``predict`` build (:class:`qwenvl.infer.Inference`:
the model folder's own template through its processor, ``--reasoning-effort`` as template arguments) is the training
sample's tokens up to the answer, and the generation prompt's own tail is what training trains the model to write
first: ``<think>\\n`` for thinking data, nothing for an answer without reasoning when thinking is off (``none``),
whose empty think block the prompt then holds. ``datasets preview`` builds the training sample itself."""

from __future__ import annotations

import pytest

from qwenvl.data import formats
from qwenvl.data.sample import SampleBuilder, VisionBudget
from qwenvl.data.vision import VisionSpec
from qwenvl.templates import CHAT_TEMPLATES, generation_kwargs

QWEN3_SPEC = VisionSpec(patch_size=16, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
LIMITS = {"min_pixels": 4 * 32 * 32, "max_pixels": 64 * 32 * 32}
IMAGE = "images/photo_640x480.jpg"


@pytest.fixture(scope="module", params=["qwen3.5", "qwen3.6", "qwen3.8"])
def folder(request, tmp_path_factory):
    """A Qwen3.5-family tokenizer + processor folder carrying the template (what a trained model folder holds)."""
    from transformers import AutoProcessor, AutoTokenizer

    from qwenvl.infer import Inference
    from qwenvl.tiny import build_tokenizer_dir

    d = build_tokenizer_dir(tmp_path_factory.mktemp(request.param), family="qwen3_5")
    (d / "chat_template.jinja").write_bytes(CHAT_TEMPLATES[request.param].encode())
    proc = AutoProcessor.from_pretrained(d)
    proc.image_processor.size = {"shortest_edge": LIMITS["min_pixels"], "longest_edge": LIMITS["max_pixels"]}
    engine = Inference(model=None, processor=proc, folder=None, exif=True, **LIMITS)
    builder = SampleBuilder(AutoTokenizer.from_pretrained(d), VisionBudget(**LIMITS), spec=QWEN3_SPEC,
                            model_type="qwen3_5")
    assert builder.rendering == request.param  # detected from the folder's template
    return request.param, engine, builder


@pytest.fixture(scope="module")
def media(repo_root):
    return repo_root / "tests" / "golden" / "official-qwen3vl-head" / "media"


def _sample(builder, rec, media, **keys):
    return builder.build(rec, str(media), formats.FormatSpec(name="messages", declared=True, **keys))


def _first_trained(sample) -> int:
    return next(i for i, x in enumerate(sample["labels"].tolist()) if x != -100)


CASES = [  # (user text, image?, system, answer)
    ("What is 2+2?", False, None, "4"),
    ("Describe it.", True, None, "A photo."),
    ("Be brief: what is it?", True, "You are terse.", "A photo."),
]


@pytest.mark.parametrize("user, image, system, answer", CASES)
def test_prompt_is_the_training_prefix_for_thinking_data(folder, media, user, image, system, answer):
    _name, engine, builder = folder
    rec = {"messages": ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": ("<image>\n" if image else "") + user},
        {"role": "assistant", "content": answer, "reasoning_content": "Let me look."}], **({"images": [IMAGE]} if image
                                                                                       else {})}
    sample = _sample(builder, rec, media)
    k = _first_trained(sample)
    engine.template_kwargs = {}
    inputs = engine.prompt_inputs(engine.messages(user, images=[str(media / IMAGE)] * image, system=system))
    ids = inputs["input_ids"][0].tolist()
    assert ids == sample["input_ids"][:k + 2].tolist()  # the prompt ends with <think>\n: the first trained tokens
    assert builder.tokenizer.decode(ids[k:]) == "<think>\n"
    if image:
        assert inputs["image_grid_thw"].tolist() == sample["image_grid_thw"].tolist()


@pytest.mark.parametrize("effort", ["none", "low"])
def test_prompt_with_the_datasets_effort_is_the_training_prefix(folder, media, effort):
    """An answer without reasoning: with thinking off the prompt holds the empty think block training masks; with
    Qwen3.8's effort low both carry its sentence in the system message (predict passes the dataset's effort)."""
    name, engine, builder = folder
    rec = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]}
    sample = _sample(builder, rec, media, reasoning_effort=effort)
    k = _first_trained(sample)
    engine.template_kwargs = generation_kwargs(effort)
    ids = engine.prompt_inputs(engine.messages("Name a colour."))["input_ids"][0].tolist()
    text = builder.tokenizer.decode(ids)
    if effort == "none":
        assert ids == sample["input_ids"][:k].tolist() and text.endswith("<think>\n\n</think>\n\n")
    else:  # thinking on: the prompt opens the block the model then fills
        assert ids[:k - 4] == sample["input_ids"][:k - 4].tolist() and text.endswith("<think>\n")
        assert ("Reasoning effort is set to low." in text) == (name == "qwen3.8")


def test_a_chat_history_renders_as_the_training_conversation(folder, media):
    """`vlsft chat`'s second turn: the history (the first reply as generated, its reasoning moved into
    reasoning_content by Inference.reply_turn) renders as the training sample of the whole conversation does, up to
    the last answer - for Qwen3.8 too, whose template keeps that reasoning."""
    _name, engine, builder = folder
    first = "The user greets me.\n</think>\n\nHello!"  # a generated reply: the prompt held the opening <think>
    rec = {"messages": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "<think>\n" + first},
                        {"role": "user", "content": "How are you?"},
                        {"role": "assistant", "content": "Fine.", "reasoning_content": "Answer politely."}]}
    sample = _sample(builder, rec, media)
    ids = sample["input_ids"].tolist()
    start = max(i for i in range(len(ids)) if builder.tokenizer.decode(ids[i:i + 2]) == "<|im_start|>assistant")
    engine.template_kwargs = {}
    history = engine.messages("Hi") + [engine.reply_turn(first)]
    prompt = engine.prompt_inputs(history + engine.messages("How are you?"))["input_ids"][0].tolist()
    assert prompt == ids[:start + 5]  # ... <|im_start|> assistant \n <think> \n

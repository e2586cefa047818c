"""``vlsft chat``: ask a trained model something, with the run's processor, chat template and pixel limits.

    vlsft chat runs/demo --image configs/demo/images/red_square.png "What colour is the shape?"
    vlsft chat runs/demo/checkpoint-30 --show-prompt "Hello"      # print the exact prompt tokens first
    vlsft chat runs/demo                                           # a prompt loop (empty line or Ctrl-D ends)

MODEL_DIR: a run's output dir, a checkpoint-N folder, a merged export or a LoRA adapter export. Media go through
``qwen_vl_utils.process_vision_info`` (as Qwen's inference examples) with the run's min/max pixels; asking for
other limits (``--max-pixels``) works but prints one warning line. Tokens stream as they are generated; GPU when
available, else CPU. Exit 0, or 2 with one ``error:`` line for bad input (a folder that is not a model, has no
tokenizer or has processor settings that cannot be read is refused before the model loads). See
:mod:`qwenvl.infer`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from vlsft.app import app


@app.command("chat")
def chat_cmd(
    model_dir: Path = typer.Argument(..., metavar="MODEL_DIR", help="A run's output dir, a checkpoint-N folder "
                                     "or a vlsft export."),
    prompt: str = typer.Argument(None, metavar="[PROMPT]", help="Ask once and exit; without it, a prompt loop."),
    image: list[str] = typer.Option([], "--image", help="Image path or URL (repeatable), shown before the text."),
    video: list[str] = typer.Option([], "--video", help="Video path (repeatable)."),
    system: str = typer.Option(None, "--system", help="System prompt (default: the chat template's)."),
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Print the prompt tokens (vision pads "
                                     "collapsed) before the answer."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy; above 0: sampling."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (with --temperature)."),
    min_pixels: int = typer.Option(None, "--min-pixels", min=1, help="Image pixel floor (default: the run's)."),
    max_pixels: int = typer.Option(None, "--max-pixels", min=1, help="Image pixel budget (default: the run's)."),
    reasoning_effort: str = typer.Option(None, "--reasoning-effort", metavar="EFFORT", help="Qwen3.5 / 3.6 / 3.8 "
                                         "chat templates: none = thinking off (as a dataset's reasoning_effort "
                                         "none); xhigh, medium, low = Qwen3.8's effort (default: the template's)."),
) -> None:
    """Chat with a trained model (one answer, or a prompt loop without PROMPT)."""
    from qwenvl.problems import UserError
    from vlsft.render import fail

    try:
        from qwenvl import infer

        # one line for a folder that is not a model, or lacks a tokenizer / readable processor settings, before
        # loading anything
        infer.check_folder(model_dir)
        infer.check_inputs(model_dir, min_pixels=min_pixels, max_pixels=max_pixels, videos=video)
        from qwenvl.templates import generation_kwargs

        try:
            kwargs = generation_kwargs(reasoning_effort)
        except ValueError as e:
            raise UserError(f"--reasoning-effort: {e}") from None
        engine = infer.load(model_dir, min_pixels=min_pixels, max_pixels=max_pixels)
        engine.template_kwargs = kwargs
        warning = engine.budget_warning()
        if warning:
            print(warning, file=sys.stderr)
        history: list[dict] = []

        def answer(text: str, first: bool) -> None:
            turn = engine.messages(text, images=image if first else (), videos=video if first else (),
                                   system=system if first else None)
            history.extend(turn)
            inputs = engine.prompt_inputs(history)
            if show_prompt:
                print(engine.show_prompt(inputs), flush=True)
                print("---", flush=True)
            reply = engine.generate(inputs, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    stream=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            sys.stdout.write("\n")
            sys.stdout.flush()
            history.append(engine.reply_turn(reply))

        if prompt is not None:
            answer(prompt, True)
            return
        first = True
        while True:
            try:
                text = input("> ")
            except EOFError:
                break
            if not text.strip() or text.strip() in ("exit", "quit"):
                break
            answer(text, first)
            first = False
    except UserError as exc:
        fail(exc)

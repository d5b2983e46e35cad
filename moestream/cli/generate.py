"""`moestream generate`: one prompt in, the continuation on stdout, timings on stderr (for scripts).

With --chat, `--image FILE` (repeatable) puts images before the prompt in the user message."""

from __future__ import annotations

import json
import sys

import click

from ..errors import ContextFull, MoestreamError
from .app import cli, load_llm, runtime_options, sampling_options


def timing_lines(turn) -> str:
    """llama.cpp's two timing lines of a reply (a TurnStats), which users already read."""
    def line(label, seconds, n, unit):
        ms = seconds * 1000
        per = ms / n if n else 0.0
        tps = n / seconds if seconds > 0 else 0.0
        return f"{label} = {ms:10.2f} ms / {n:5d} {unit} ({per:8.2f} ms per token, {tps:8.2f} tokens per second)"

    return "\n".join([
        line("prompt eval time", turn.prompt_seconds, turn.prompt_tokens, "tokens"),
        line("       eval time", turn.generation_seconds, turn.generated_tokens, "runs  "),
    ])


@cli.command()
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None, help="Read the prompt from a file.")
@click.option("--chat/--raw", default=False, show_default=True,
              help="--chat wraps the prompt as a user message in the model's chat template; --raw completes it as is.")
@click.option("-sys", "--system-prompt", default=None, help="System message (with --chat).")
@click.option("--image", "image_paths", multiple=True, metavar="FILE",
              help="An image for the user message, before the prompt (with --chat; repeat for more).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the text and timings.")
@runtime_options
@sampling_options
def generate(prompt, prompt_file, chat, system_prompt, image_paths, as_json, runtime, params):
    """Complete a prompt (from -p, -f FILE or stdin) and print the continuation."""
    if prompt is None and prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                prompt = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise MoestreamError(f"cannot read prompt file {prompt_file}: {getattr(e, 'strerror', None) or e}") from None
    if prompt is None:
        if sys.stdin.isatty():
            raise MoestreamError("no prompt: pass -p TEXT, -f FILE, or pipe text on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise MoestreamError("the prompt is empty")
    if image_paths and not chat:
        raise MoestreamError("--image needs --chat: images go in the user message of the chat template")

    llm = load_llm(runtime)
    if chat:
        content = [*({"type": "image", "path": p} for p in image_paths), {"type": "text", "text": prompt}] \
            if image_paths else prompt
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]
        request = messages
    else:
        request = prompt
    stream = None if as_json else (lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    try:
        text = llm.complete(request, params, stream=stream)
    except ContextFull as e:  # a one-shot prompt that overflows: say so in this command's words
        raise MoestreamError(f"the prompt is {e.tokens} tokens and the context holds {e.limit}: "
                             "shorten the prompt or raise -c") from None
    stats = llm.stats()
    if as_json:  # the reply's timings at the top, as scripts read them; every counter under "stats"
        d = stats.as_dict()
        click.echo(json.dumps({"text": text, **d["turn"], "stats": d}))
    else:
        sys.stdout.write("\n")
        click.echo(timing_lines(stats.turn), err=True)

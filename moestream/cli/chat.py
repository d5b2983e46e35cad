"""`moestream chat`: an interactive conversation in the terminal, as llama-cli / ollama users expect.

Ctrl+C once stops the reply (the partial reply stays in the history); twice in a row exits with
status 130; Ctrl+D or /bye exits. A failed reply leaves the history as it was.
"""

from __future__ import annotations

import sys

import click
from rich.console import Console

from ..errors import MoestreamError
from .main import cli, load_llm, runtime_options, sampling_options

HELP = """commands:
  /help, /?        this help
  /clear           forget the conversation
  /exit, /bye      quit (Ctrl+D too; Ctrl+C twice exits with status 130)
  \"\"\"              open and close a multi-line message"""


def read_message(prompt: str = "> ") -> str:
    """One message from the user; a line of \"\"\" opens and closes a multi-line message."""
    line = input(prompt)
    if line.strip() != '"""' and not line.startswith('"""'):
        return line
    lines = [line[3:]] if line.strip() != '"""' else []
    while True:
        more = input("... ")
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(more)


@cli.command()
@click.option("-sys", "--system-prompt", default=None, help="System message that opens the conversation.")
@runtime_options
@sampling_options
def chat(system_prompt, runtime, params):
    """Chat with a model in the terminal (default: the embedded Shakespeare model)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console(highlight=False)
    with console.status("loading model..."):
        llm = load_llm(runtime)
    if llm.tokenizer is None:
        raise MoestreamError(f"{runtime.model} has no tokenizer.json, so it cannot chat")
    console.print(f"[dim]moestream chat · {runtime.model.name} · {llm.device.type} {str(llm.dtype).removeprefix('torch.')} · "
                  "/help for commands, Ctrl+C stops a reply, Ctrl+D exits[/dim]")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict] = []
    interrupted = False  # the last thing that happened was a Ctrl+C

    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            if interrupted:
                console.print()
                sys.exit(130)
            interrupted = True
            console.print("\n[dim](Ctrl+C again to exit, or /bye)[/dim]")
            continue
        except EOFError:
            console.print()
            return
        interrupted = False
        command = text.strip()
        if command in ("/exit", "/bye"):
            return
        if command in ("/help", "/?"):
            console.print(HELP)
            continue
        if command == "/clear":
            history.clear()
            llm.reset()
            console.print("[dim]conversation cleared[/dim]")
            continue
        if command.startswith("/"):
            console.print(f"unknown command {command.split()[0]}: /help lists the commands")
            continue
        if not command:
            console.print("[dim](empty message: type something, or /help)[/dim]")
            continue

        history.append({"role": "user", "content": text})
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            llm.complete(system + history, params, stream=show)
        except KeyboardInterrupt:
            interrupted = True
            console.print("\n[interrupted: the partial reply is kept]", style="dim", markup=False)
        except MoestreamError as e:
            history.pop()
            console.print(f"\nerror: {e}")
            continue
        history.append({"role": "assistant", "content": "".join(pieces)})
        s = llm.stats()
        console.print(f"\n[ Prompt: {s.prompt_tps:.1f} t/s | Generation: {s.generation_tps:.1f} t/s ]", style="dim", markup=False)

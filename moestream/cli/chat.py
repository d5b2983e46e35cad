"""`moestream chat`: an interactive conversation in the terminal, as llama-cli / ollama users expect.

Ctrl+C once stops the reply (the partial reply stays in the history; one stopped before its first
token leaves nothing) or a slow command; twice in a row exits with status 130; Ctrl+D, /exit or /bye
exits. /image FILE attaches a picture to the next message (a multimodal checkpoint); /save keeps
its path, /load sends it again. Nothing can lose the conversation: a failed reply, a bad command or setting, an unreadable or
hostile file, even a bug each give one line and the history stays as it was (a bug's traceback goes
to a file in the cache directory). The UI reads only `llm.stats()` and `llm.plan`, never the caches.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import click

from ..errors import ContextFull, MoestreamError
from ..files import atomic_write, cache_dir, read_limited
from ..model.sampling import SamplingParams
from ..units import fmt_bytes
from .app import cli, register, runtime_options, sampling_options

SESSION_FORMAT = "moestream-chat/1"
HELP = """commands:
  /help, /?                 this help
  /clear                    forget the conversation
  /regen                    generate the last reply again
  /read FILE                send a file's text as your message
  /image FILE               attach an image to your next message (several allowed)
  /save FILE, /load FILE    the conversation and settings, as JSON
  /set KEY VALUE            temperature, top_p, top_k, max_tokens, seed, repeat_penalty, system
  /stats                    the runtime's counters
  /show                     model, placement and budgets
  /exit, /bye               quit (Ctrl+D too; Ctrl+C twice exits with status 130)
  \"\"\"                       open and close a multi-line message"""
# /set KEY -> the SamplingParams field it changes (system is the conversation's, not sampling's)
SETTABLE = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "max_tokens": "max_tokens",
            "seed": "seed", "repeat_penalty": "repetition_penalty", "system": None}
SESSION_LIMIT = 16 * 2**20  # bytes of a /load file: far more than any context holds, far less than RAM
SESSION_DEPTH = 64  # JSON nesting a /load file may have (a session needs 3); a parser recurses per level
READ_LIMIT = 2**20  # bytes of a /read file
NOT_UTF8 = ("error: that input is not valid UTF-8: type it again (a UTF-8 terminal locale, e.g. LANG=C.UTF-8, "
            "avoids this)")


class ChatError(MoestreamError):
    """A command that could not be carried out; its message is shown as one line."""


def is_utf8(text: str) -> bool:
    """False for text holding surrogate escapes: what stdin delivers for non-UTF-8 bytes under the C
    locale (and what JSON's \\ud800 escapes make); the tokenizer and the terminal cannot take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_message(prompt: str = "> ") -> str:
    """One message from the user; a line of \"\"\" opens and closes a multi-line message."""
    line = input(prompt)
    if not line.startswith('"""'):
        return line
    lines = [line[3:]] if line.strip() != '"""' else []
    while True:
        more = input("... ")
        if more.rstrip().endswith('"""'):
            lines.append(more.rstrip()[:-3])
            return "\n".join(lines).strip()
        lines.append(more)


class ChatSession:
    """The conversation, its settings, and the commands that change them."""

    def __init__(self, llm, params: SamplingParams, system: str | None, console: Console, verbose: bool):
        self.llm, self.params, self.system, self.console, self.verbose = llm, params, system, console, verbose
        self.history: list[dict] = []
        self.pending: list[dict] = []  # image parts /image attached to the next message

    # --- talking ---------------------------------------------------------------------------------
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str) -> bool:
        """Send a user message, with the images attached to it, and stream the answer; returns True if
        Ctrl+C stopped it. The attached images stay attached until a message that carries them is kept."""
        content = [*self.pending, {"type": "text", "text": text}] if self.pending else text
        before = len(self.history)
        interrupted = self.send(content)
        if len(self.history) > before:
            self.pending = []
        return interrupted

    def send(self, content) -> bool:
        """Send one user message (text, or a list of text and image parts) and stream the answer."""
        self.history.append({"role": "user", "content": content})
        pieces: list[str] = []

        def show(piece: str) -> None:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        interrupted = False
        try:
            self.llm.complete(self.messages(), self.params, stream=show)
        except KeyboardInterrupt:
            interrupted = True
            if not pieces:  # nothing to keep: no empty assistant turn, and the unanswered message goes too
                self.history.pop()
                self.console.print("\n[interrupted before the first token: nothing was added to the conversation]",
                                   style="dim", markup=False)
                return True
            self.console.print("\n[interrupted: the partial reply is kept]", style="dim", markup=False)
        except MoestreamError as e:
            self.history.pop()
            if pieces:
                sys.stdout.write("\n")
            if isinstance(e, ContextFull):
                e = f"the prompt is {e.tokens} tokens and the context holds {e.limit}: start a new conversation (/clear) or raise -c"
            raise ChatError(f"{e} (the conversation is kept)") from None
        except Exception:  # a bug or a torch error: the turn is dropped, the loop reports it in one line
            self.history.pop()
            if pieces:
                sys.stdout.write("\n")
            raise
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        self.console.print()
        self.console.print(status_line(self.llm.stats()), style="dim", markup=False, soft_wrap=True)
        if self.verbose:
            self.console.print(verbose_block(self.llm.stats()), markup=False, highlight=False)
        return interrupted

    def regen(self) -> bool:
        """Answer the last user message again; a new reply that fails or stops before its first token
        leaves the old one in place."""
        if len(self.history) < 2 or [m["role"] for m in self.history[-2:]] != ["user", "assistant"]:
            raise ChatError("nothing to regenerate yet")
        old = self.history[-2:]
        del self.history[-2:]
        before = len(self.history)
        try:
            interrupted = self.send(old[0]["content"])
        except BaseException:
            self.history.extend(old)
            raise
        if len(self.history) == before:
            self.history.extend(old)
        return interrupted

    # --- commands --------------------------------------------------------------------------------
    def set(self, args: str) -> str:
        """/set KEY VALUE: the value is checked by SamplingParams, as a flag's is."""
        from dataclasses import replace

        key, _, value = args.strip().partition(" ")
        key, value = {"temp": "temperature", "repetition_penalty": "repeat_penalty"}.get(key, key), value.strip()
        if key not in SETTABLE or not value:
            raise ChatError(f"usage: /set {{{'|'.join(SETTABLE)}}} VALUE")
        if key == "system":
            self.system = value
            return f"system prompt set ({len(self.system)} characters)"
        name = SETTABLE[key]
        self.params = replace(self.params, **{name: SamplingParams.parse(name, value)})
        return f"{key} = {getattr(self.params, name)}"

    def save(self, path: str) -> str:
        """Written whole or not at all (the previous file survives a full disk), and only over a saved chat."""
        from ..files import atomic_write

        if not path:
            raise ChatError("usage: /save FILE")
        model = str(self.llm.runtime.model).encode("utf-8", "replace").decode("utf-8")  # a non-UTF-8 path
        data = {"format": SESSION_FORMAT, "model": model, "system": self.system,
                "messages": self.history, "settings": asdict(self.params)}
        atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", ours=is_session_file,
                     what="a saved moestream chat", fix="choose another file name")
        return f"saved {len(self.history)} messages to {path}"

    def load(self, path: str) -> str:
        """Everything is checked before anything changes: a bad file leaves the conversation as it was."""
        from dataclasses import replace

        if not path:
            raise ChatError("usage: /load FILE")
        messages, system, settings = read_session(path)
        try:
            params = replace(self.params, **settings)
        except MoestreamError as e:
            raise ChatError(f"{path} has a bad setting: {e}; the conversation is unchanged") from None
        self.params, self.system, self.history = params, system, messages
        self.llm.reset()
        return f"loaded {len(self.history)} messages from {path}"

    def attach(self, path: str) -> str:
        """/image FILE: checked now (the model can see, the count, the file decodes), sent with the next
        message. The path is kept absolute, so a /save-d chat finds it from anywhere."""
        from ..model.images import image_bytes, open_image
        from ..model.tokenizer import chat_parts

        if not path:
            raise ChatError("usage: /image FILE")
        count = len(chat_parts(self.history)[1]) + len(self.pending) + 1
        self.llm.check_images(count)
        part = {"type": "image", "path": str(Path(path).expanduser().absolute())}
        with open_image(image_bytes(part), name=part["path"]) as im:
            w, h = im.size
        self.pending.append(part)
        more = f" ({len(self.pending)} attached)" if len(self.pending) > 1 else ""
        return f"attached {part['path']} ({w} x {h}){more}: it goes with your next message"

    def read_file(self, path: str) -> str:
        """/read FILE: a regular UTF-8 text file of at most 1 MiB (never a FIFO or a device that could hang
        or never end)."""
    
        if not path:
            raise ChatError("usage: /read FILE")
        data = read_limited(path, READ_LIMIT, "/read", "send a shorter text file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ChatError(f"{path} is not UTF-8 text: /read sends text files only") from None
        if not text.strip():
            raise ChatError(f"{path} is empty: nothing to send")
        return text

    def stats_table(self) -> Table:
        from rich.table import Table

        t = Table(title="runtime counters", show_header=True, header_style="bold")
        t.add_column("counter")
        t.add_column("value", justify="right")
        for group, counters in self.llm.stats().as_dict().items():
            for key, value in counters.items() if isinstance(counters, dict) else [("", counters)]:
                if isinstance(value, float):
                    value = f"{value:.4g}"
                t.add_row(f"{group}.{key}" if key else group, str(value))
        return t

    def show(self) -> str:
        llm, p, rt = self.llm, self.llm.plan, self.llm.runtime
        c = llm.config
        lines = [
            f"model: {rt.model} ({c.num_hidden_layers} layers, {len(c.moe_layers)} MoE x {c.num_local_experts} experts, "
            f"top-{c.num_experts_per_tok}, vocab {c.vocab_size})",
            f"device: {llm.device} {str(llm.dtype).removeprefix('torch.')}; context {llm.ctx_size} tokens; "
            f"KV {p.kv.k_type}/{p.kv.v_type}",
            f"experts: {'all resident' if p.resident else f'{p.cache_slots} cache slots, {p.host_experts} in host RAM, {p.disk_experts} on disk'}"
            + (f"; CPU layers {sorted(p.cpu_layers)}" if p.cpu_layers else ""),
            f"budgets: gpu-mem {fmt_bytes(p.gpu_mem) if p.gpu_mem else 'none'}, cpu-mem "
            f"{fmt_bytes(rt.cpu_mem) if rt.cpu_mem is not None else 'auto'}, kv-gpu-mem "
            f"{fmt_bytes(rt.kv_gpu_mem) if rt.kv_gpu_mem is not None else 'none'}",
            "sampling: " + ", ".join(f"{k}={v}" for k, v in asdict(self.params).items()),
            f"system: {self.system!r}",
        ]
        return "\n".join(lines)


def json_depth(value) -> int:
    """Levels of lists and objects in a parsed JSON value, counted level by level (no recursion)."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, (list, dict))]:
        depth += 1
        level = [child for v in level for child in (v.values() if isinstance(v, dict) else v)]
    return depth


def parse_session(data: bytes):
    """A /load file's JSON value, or ValueError saying why there is none. Deep nesting is refused, never
    a crash: json.loads recurses once per level and stops with RecursionError near 1000 levels."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    try:
        value = json.loads(text)
    except RecursionError:
        value = None
    except ValueError:  # JSONDecodeError, or an integer too long to convert
        raise ValueError("not valid JSON") from None
    else:
        if json_depth(value) <= SESSION_DEPTH:
            return value
    raise ValueError(f"JSON nested deeper than {SESSION_DEPTH} levels")


def is_session_file(path: Path) -> bool:
    """`ours` for /save: only a file with our format marker is replaced."""

    try:
        data = parse_session(read_limited(path, SESSION_LIMIT, "/save", "choose another file name"))
    except (MoestreamError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == SESSION_FORMAT


def read_session(path: str) -> tuple[list[dict], str | None, dict]:
    """(messages, system, settings) of a saved chat, checked against the format; one line if not."""

    data = read_limited(path, SESSION_LIMIT, "/load", "give the path of a file /save wrote")

    def refuse(why: str):
        return ChatError(f"{path} is not a saved moestream chat ({why}); the conversation is unchanged")

    try:
        data = parse_session(data)
    except ValueError as e:
        raise refuse(str(e)) from None
    if not isinstance(data, dict):
        raise refuse(f"the top level is a JSON {type(data).__name__}, not an object")
    if data.get("format") != SESSION_FORMAT:
        raise refuse(f'no "format": "{SESSION_FORMAT}" marker')
    messages, system, settings = data.get("messages"), data.get("system"), data.get("settings")
    if not isinstance(messages, list):
        raise refuse('"messages" is not a list')
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):  # text and image parts (/image)
            from ..model.tokenizer import chat_parts

            try:
                chat_parts([m])
            except MoestreamError as e:
                raise refuse(str(e).replace("message 0", f"message {i}", 1)) from None
        if not (isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("user", "assistant", "system")
                and is_text_or_parts(m["content"])):
            raise refuse(f'message {i} is not {{"role": "user"|"assistant"|"system", "content": text}}')
    if not (system is None or isinstance(system, str) and is_utf8(system)):
        raise refuse('"system" is neither text nor null')
    if settings is None:
        settings = {}
    if not isinstance(settings, dict):
        raise refuse('"settings" is not an object')
    unknown = sorted(repr(k) for k in settings if k not in {f.name for f in fields(SamplingParams)})
    if unknown:
        raise refuse(f"unknown setting {unknown[0][:40]}")
    return list(messages), system, settings


def is_text_or_parts(content) -> bool:
    """A message's content as /save writes it: UTF-8 text, or a non-empty list of parts whose strings
    are UTF-8 (chat_parts has checked their shapes)."""
    if isinstance(content, str):
        return is_utf8(content)
    if not isinstance(content, list) or not content:
        return False
    return all(is_utf8(v) for part in content if isinstance(part, dict) for v in part.values() if isinstance(v, str))


def report_crash(e: BaseException) -> str:
    """The one line for an unexpected exception; its traceback goes to a new file in the cache directory."""
    import os
    import secrets
    import time
    import traceback


    first = (str(e).strip().splitlines() or [""])[0][:200].encode("utf-8", "replace").decode("utf-8")
    what = f"{type(e).__name__}: {first}" if first else type(e).__name__
    path = cache_dir() / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(4)}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "".join(traceback.format_exception(type(e), e, e.__traceback__)))
        where = f"details in {path}"
    except (OSError, MoestreamError) as w:
        where = f"the details could not be written ({w})"
    return f"error: internal error ({what}); the conversation is kept; {where}"


def status_line(s) -> str:
    """The dim line after each reply."""
    e, t = s.experts, s.turn
    parts = [f"Prompt: {t.prompt_tps:.1f} t/s", f"Generation: {t.generation_tps:.1f} t/s"]
    if e.slots or e.cpu_runs:
        prefetch = e.prefetch_hits / e.hits if e.hits else 0.0
        moved = (e.bytes_host_to_device + e.bytes_disk_to_host) / 1e9
        parts.append(f"experts: hit {100 * e.hit_rate:.0f}% · prefetch {100 * prefetch:.0f}% · {moved:.2f} GB moved")
    else:
        parts.append("experts: all resident")
    parts.append(f"KV: {s.kv.tokens} tok ({s.kv.tokens_host + s.kv.tokens_disk} on host)")
    return "[ " + " | ".join(parts) + " ]"


def verbose_block(s) -> str:
    """ollama --verbose's block."""
    t = s.turn
    total = t.prompt_seconds + t.generation_seconds
    return "\n".join([
        f"total duration:       {total:.2f}s",
        f"load duration:        {1e3 * s.load_seconds:.1f}ms",
        f"prompt eval count:    {t.prompt_tokens} token(s)",
        f"prompt eval duration: {t.prompt_seconds:.2f}s",
        f"prompt eval rate:     {t.prompt_tps:.2f} tokens/s",
        f"eval count:           {t.generated_tokens} token(s)",
        f"eval duration:        {t.generation_seconds:.2f}s",
        f"eval rate:            {t.generation_tps:.2f} tokens/s",
    ])


def memory_table(llm) -> Table:
    """At exit: per device, what the runtime holds (llama.cpp's memory breakdown, in MiB)."""
    import psutil
    import torch
    from rich.table import Table

    s = llm.stats()
    m = s.memory
    t = Table(title="memory breakdown (MiB)", header_style="bold")
    for col in ("device", "model", "experts cached", "KV", "free"):
        t.add_column(col, justify="right" if col != "device" else "left")
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    if llm.device.type == "cuda":
        free = torch.cuda.mem_get_info(llm.device)[0]
        t.add_row(f"{llm.device} ({torch.cuda.get_device_name(llm.device)})", mib(m.resident_bytes), mib(m.expert_bytes),
                  mib(m.kv_bytes), mib(free))
        t.add_row("host", "-", mib(s.experts.host_bytes), mib(s.kv.host_bytes), mib(psutil.virtual_memory().available))
    else:
        t.add_row("cpu", mib(m.resident_bytes), mib(m.expert_bytes + s.experts.host_bytes), mib(m.kv_bytes + s.kv.host_bytes),
                  mib(psutil.virtual_memory().available))
    return t


def load_with_progress(runtime, console: Console):
    """Load the model; placing experts in host RAM / on disk shows a progress bar of bytes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from ..llm import LLM

    columns = (TextColumn("placing experts"), BarColumn(), DownloadColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("experts", total=None)

        def progress(nbytes: int, total: int) -> None:
            bar.update(task, total=total, advance=nbytes)

        return register(LLM(runtime, progress=progress))


@cli.command()
@click.option("-sys", "--system-prompt", default=None, help="System message that opens the conversation.")
@click.option("-sysf", "--system-prompt-file", type=click.Path(dir_okay=False), default=None,
              help="Read the system message from a file.")
@click.option("--verbose", is_flag=True, help="After each reply, ollama's timing block.")
@runtime_options
@sampling_options
def chat(system_prompt, system_prompt_file, verbose, runtime, params):
    """Chat with a model in the terminal (default: the embedded Shakespeare model)."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    from rich.console import Console

    console = Console(highlight=False)
    if system_prompt_file:
    
        data = read_limited(system_prompt_file, READ_LIMIT, "-sysf", "give a shorter text file")
        try:
            system_prompt = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise MoestreamError(f"the system prompt file {system_prompt_file} is not UTF-8 text") from None
    llm = load_with_progress(runtime, console)
    if llm.tokenizer is None:
        raise MoestreamError(f"{runtime.model} has no tokenizer.json, so it cannot chat")
    console.print(f"[dim]moestream chat · {runtime.model.name} · {llm.device.type} {str(llm.dtype).removeprefix('torch.')} · "
                  "/help for commands, Ctrl+C stops a reply, Ctrl+D exits[/dim]")
    session = ChatSession(llm, params, system_prompt, console, verbose)
    try:
        loop(session, console)
    finally:
        if sys.stdin.isatty():
            console.print(memory_table(llm))


def loop(session: ChatSession, console: Console) -> None:
    """Read, run, repeat: whatever a command raises (a bad value, Ctrl+C, a bug) is one line, and the
    conversation goes on."""
    interrupted = False  # the last thing that happened was a Ctrl+C
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            if interrupted:
                console.print()
                sys.exit(130)
            interrupted = True
            console.print("\n(Ctrl+C again to exit, or /bye)", style="dim", markup=False)
            continue
        except EOFError:
            console.print()
            return
        except UnicodeDecodeError:
            console.print(NOT_UTF8, markup=False)
            continue
        if not is_utf8(text):
            console.print(NOT_UTF8, markup=False)
            continue
        interrupted = False
        command, _, args = text.strip().partition(" ")
        try:
            if command in ("/exit", "/bye"):
                return
            elif command in ("/help", "/?"):
                console.print(HELP, markup=False)
            elif command == "/clear":
                session.history.clear()
                session.pending.clear()
                session.llm.reset()
                console.print("conversation cleared", style="dim")
            elif command == "/regen":
                interrupted = session.regen()
            elif command == "/read":
                interrupted = session.reply(session.read_file(args.strip()))
            elif command == "/image":
                console.print(session.attach(args.strip()), style="dim", markup=False, soft_wrap=True)
            elif command == "/save":
                console.print(session.save(args.strip()), style="dim", markup=False, soft_wrap=True)
            elif command == "/load":
                console.print(session.load(args.strip()), style="dim", markup=False, soft_wrap=True)
            elif command == "/set":
                console.print(session.set(args), style="dim", markup=False)
            elif command == "/stats":
                console.print(session.stats_table())
            elif command == "/show":
                console.print(session.show(), markup=False, soft_wrap=True)
            elif command.startswith("/") and " " not in command and len(command) > 1:
                console.print(f"unknown command {command}: /help lists the commands", markup=False)
            elif not text.strip():
                console.print("(empty message: type something, or /help)", style="dim", markup=False)
            else:
                interrupted = session.reply(text)
        except KeyboardInterrupt:  # in a command (a slow /read, a /save): back to the prompt
            interrupted = True
            console.print("\n[interrupted: back at the prompt; the conversation is kept]", style="dim", markup=False)
        except MoestreamError as e:  # ChatError too
            console.print(f"error: {e}", markup=False, soft_wrap=True)
        except Exception as e:  # a bug: one line, the traceback in a file, the conversation goes on
            console.print(report_crash(e), markup=False, soft_wrap=True)

"""`moestream chat`: an interactive conversation in the terminal, as llama-cli / ollama users expect.

Ctrl+C once stops the reply (the partial reply stays in the history); twice in a row exits with
status 130; Ctrl+D, /exit or /bye exits. Nothing a user types can lose the conversation: a failed
reply, a bad command or an unreadable file each give one line and the history stays as it was.
The UI reads only `llm.stats()` and `llm.plan`, never the caches themselves.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import click
import psutil
import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from ..errors import MoestreamError
from ..model.sampling import SamplingParams
from ..scheduler.plan import fmt_bytes
from .main import cli, runtime_options, sampling_options

SESSION_FORMAT = "moestream-chat/1"
HELP = """commands:
  /help, /?                 this help
  /clear                    forget the conversation
  /regen                    generate the last reply again
  /read FILE                send a file's text as your message
  /save FILE, /load FILE    the conversation and settings, as JSON
  /set KEY VALUE            temperature, top_p, top_k, max_tokens, seed, repeat_penalty, system
  /stats                    the runtime's counters
  /show                     model, placement and budgets
  /exit, /bye               quit (Ctrl+D too; Ctrl+C twice exits with status 130)
  \"\"\"                       open and close a multi-line message"""
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
            "repeat_penalty": float, "system": str}


class ChatError(Exception):
    """A command that could not be carried out; its message is shown as one line."""


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

    # --- talking ---------------------------------------------------------------------------------
    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def reply(self, text: str) -> bool:
        """Send a user message and stream the answer; returns True if Ctrl+C stopped it."""
        self.history.append({"role": "user", "content": text})
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
            self.console.print("\n[interrupted: the partial reply is kept]", style="dim", markup=False)
        except MoestreamError as e:
            self.history.pop()
            raise ChatError(f"{e} (the conversation is kept)") from None
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        self.console.print()
        self.console.print(status_line(self.llm.stats()), style="dim", markup=False, soft_wrap=True)
        if self.verbose:
            self.console.print(verbose_block(self.llm.stats()), markup=False, highlight=False)
        return interrupted

    def regen(self) -> bool:
        if not self.history or self.history[-1]["role"] != "assistant":
            raise ChatError("nothing to regenerate yet")
        self.history.pop()
        return self.reply(self.history.pop()["content"])

    # --- commands --------------------------------------------------------------------------------
    def set(self, args: str) -> str:
        key, _, value = args.strip().partition(" ")
        key = {"temp": "temperature", "repetition_penalty": "repeat_penalty"}.get(key, key)
        if key not in SETTABLE or not value.strip():
            raise ChatError(f"usage: /set {{{'|'.join(SETTABLE)}}} VALUE")
        if key == "system":
            self.system = value.strip()
            return f"system prompt set ({len(self.system)} characters)"
        try:
            v = SETTABLE[key](value.strip())
        except ValueError:
            raise ChatError(f"{key} needs a {SETTABLE[key].__name__}, not {value.strip()!r}") from None
        limits = {"temperature": v < 0, "top_p": not 0 <= v <= 1, "top_k": v < 0, "max_tokens": v < 1,
                  "repeat_penalty": v <= 0, "seed": False}
        if limits[key]:
            raise ChatError(f"{key} {v} is out of range")
        setattr(self.params, "repetition_penalty" if key == "repeat_penalty" else key, v)
        return f"{key} = {v}"

    def save(self, path: str) -> str:
        data = {"format": SESSION_FORMAT, "model": str(self.llm.runtime.model), "system": self.system,
                "messages": self.history, "settings": asdict(self.params)}
        try:
            Path(path).expanduser().write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as e:
            raise ChatError(f"cannot write {path}: {e.strerror}") from None
        return f"saved {len(self.history)} messages to {path}"

    def load(self, path: str) -> str:
        try:
            data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        except OSError as e:
            raise ChatError(f"cannot read {path}: {e.strerror}") from None
        except (ValueError, UnicodeDecodeError):
            raise ChatError(f"{path} is not a saved chat (not valid JSON); the conversation is unchanged") from None
        ok = (isinstance(data, dict) and data.get("format") == SESSION_FORMAT and isinstance(data.get("messages"), list)
              and all(isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")
                      and isinstance(m.get("content"), str) for m in data["messages"]))
        if not ok:
            raise ChatError(f"{path} is not a saved moestream chat; the conversation is unchanged")
        settings = data.get("settings") or {}
        known = {f.name for f in fields(SamplingParams)}
        self.params = SamplingParams(**{k: v for k, v in settings.items() if k in known})
        self.system, self.history = data.get("system"), list(data["messages"])
        self.llm.reset()
        return f"loaded {len(self.history)} messages from {path}"

    def read_file(self, path: str) -> str:
        try:
            return Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as e:
            raise ChatError(f"cannot read {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ChatError(f"{path} is not UTF-8 text") from None

    def stats_table(self) -> Table:
        t = Table(title="runtime counters", show_header=True, header_style="bold")
        t.add_column("counter")
        t.add_column("value", justify="right")
        for key, value in self.llm.stats().as_dict().items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            t.add_row(key, str(value))
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


def status_line(s) -> str:
    """The dim line after each reply."""
    parts = [f"Prompt: {s.prompt_tps:.1f} t/s", f"Generation: {s.generation_tps:.1f} t/s"]
    if s.cache_slots or s.cpu_experts:
        prefetch = s.prefetch_hits / s.expert_hits if s.expert_hits else 0.0
        moved = (s.bytes_host_to_device + s.bytes_disk_to_host) / 1e9
        parts.append(f"experts: hit {100 * s.hit_rate:.0f}% · prefetch {100 * prefetch:.0f}% · {moved:.2f} GB moved")
    else:
        parts.append("experts: all resident")
    parts.append(f"KV: {s.kv_tokens} tok ({s.kv_tokens_host + s.kv_tokens_disk} on host)")
    return "[ " + " | ".join(parts) + " ]"


def verbose_block(s) -> str:
    """ollama --verbose's block."""
    total = s.prompt_seconds + s.generation_seconds
    return "\n".join([
        f"total duration:       {total:.2f}s",
        f"load duration:        {1e3 * s.load_seconds:.1f}ms",
        f"prompt eval count:    {s.prompt_tokens} token(s)",
        f"prompt eval duration: {s.prompt_seconds:.2f}s",
        f"prompt eval rate:     {s.prompt_tps:.2f} tokens/s",
        f"eval count:           {s.generated_tokens} token(s)",
        f"eval duration:        {s.generation_seconds:.2f}s",
        f"eval rate:            {s.generation_tps:.2f} tokens/s",
    ])


def memory_table(llm) -> Table:
    """At exit: per device, what the runtime holds (llama.cpp's memory breakdown, in MiB)."""
    s = llm.stats()
    t = Table(title="memory breakdown (MiB)", header_style="bold")
    for col in ("device", "model", "experts cached", "KV", "free"):
        t.add_column(col, justify="right" if col != "device" else "left")
    mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
    if llm.device.type == "cuda":
        free = torch.cuda.mem_get_info(llm.device)[0]
        t.add_row(f"{llm.device} ({torch.cuda.get_device_name(llm.device)})", mib(s.resident_bytes), mib(s.expert_bytes),
                  mib(s.kv_bytes), mib(free))
        t.add_row("host", "-", mib(s.host_expert_bytes), mib(s.kv_host_bytes), mib(psutil.virtual_memory().available))
    else:
        t.add_row("cpu", mib(s.resident_bytes), mib(s.expert_bytes + s.host_expert_bytes), mib(s.kv_bytes + s.kv_host_bytes),
                  mib(psutil.virtual_memory().available))
    return t


def load_with_progress(runtime, console: Console):
    """Load the model; placing experts in host RAM / on disk shows a progress bar of bytes."""
    from ..llm import LLM
    from .main import register

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
    console = Console(highlight=False)
    if system_prompt_file:
        try:
            system_prompt = Path(system_prompt_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise MoestreamError(f"cannot read the system prompt file {system_prompt_file}: {getattr(e, 'strerror', None) or e}") from None
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
            console.print("that input is not valid UTF-8: type it again", markup=False)
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
                session.llm.reset()
                console.print("conversation cleared", style="dim")
            elif command == "/regen":
                interrupted = session.regen()
            elif command == "/read":
                interrupted = session.reply(session.read_file(args.strip()))
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
        except ChatError as e:
            console.print(f"error: {e}", markup=False, soft_wrap=True)

"""Settings declared once: each field of a settings dataclass carries its flag, help text, parser,
choices and its one default, and everything else is derived from that declaration — the click
options of every command, `moestream.load(**settings)`, `bench`'s comma-list sweeps, the chat's
/set, error messages that name the flag.

    @dataclass(frozen=True)
    class RuntimeConfig:
        gpu_mem: int | None = setting(None, "--gpu-mem", parse=size, help="...")

`RuntimeConfig.build(**values)` parses and checks what a person or a caller gave (text or values;
None = not given = the default) and raises MoestreamError with one line naming the flag.
torch is imported inside the functions that need it: `moestream --help` must not pay for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from .errors import MoestreamError
from .units import parse_count, parse_size

DEFAULT_MODEL = Path(__file__).parent / "data" / "default"
DEFAULT_CTX = 8192  # the context when -c is not given (capped by the model's maximum)


@dataclass(frozen=True)
class Setting:
    """How one setting is spelled, explained, parsed and offered (what a dataclass field carries)."""

    flags: tuple[str, ...]  # e.g. ("-c", "--ctx-size"); the first long one is the keyword users see
    help: str
    parse: Callable[[object, str], object]  # (value or typed text, label) -> value; raises MoestreamError
    choices: tuple[str, ...] = ()
    switch: bool = False  # a flag without a value: giving it sets `on`
    on: object = True
    sweep: bool = True  # `bench` may take a comma list of it
    metavar: str | None = None
    name: str | None = None  # how messages name it, when not by its flags (the chat's /set names)

    @property
    def label(self) -> str:
        """How messages name it: "-c/--ctx-size", "--gpu-mem", "temperature"."""
        return self.name or "/".join(self.flags)


def setting(default, *flags: str, help: str, parse=None, choices: tuple[str, ...] = (), switch: bool = False,
            on=True, sweep: bool = True, metavar: str | None = None, name: str | None = None):
    """A dataclass field with its Setting: the one place a setting and its default are declared."""
    if parse is None:
        parse = as_bool if switch else (lambda v, label: choice(v, label, choices)) if choices else as_text
    return field(default=default, metadata={"setting": Setting(tuple(flags), help, parse, tuple(choices), switch, on,
                                                               sweep, metavar, name)})


def settings_of(cls) -> list[tuple[str, object, Setting]]:
    """(name, default, Setting) of every declared field of a settings dataclass, in order."""
    return [(f.name, f.default, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata]


def build_settings(cls, values: dict, kind: str = "setting"):
    """An instance of `cls` from given values (None = the default), each parsed by its declaration."""
    declared = {name: s for name, _, s in settings_of(cls)}
    unknown = [name for name in values if name not in declared]
    if unknown:
        raise MoestreamError(f"{unknown[0]!r} is not a {kind}: use one of {', '.join(declared)}")
    return cls(**{name: declared[name].parse(v, declared[name].label) for name, v in values.items() if v is not None})


# --- parsers: (value, label) -> value --------------------------------------------------------------
def as_text(value, label: str) -> str:
    return str(value)


def as_path(value, label: str) -> Path | None:
    return Path(value).expanduser() if value not in ("", None) else None


def as_bool(value, label: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise MoestreamError(f"{label} needs true or false, not {value!r}")


def choice(value, label: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise MoestreamError(f"{label} {value!r} is not one of {', '.join(choices)}")
    return value


def whole(value, label: str) -> int:
    if isinstance(value, bool):
        raise MoestreamError(f"{label} {value!r} is not a whole number")
    try:
        return int(str(value).strip())
    except ValueError:
        raise MoestreamError(f"{label} {value!r} is not a whole number") from None


def positive(value, label: str) -> int:
    n = whole(value, label)
    if n <= 0:
        raise MoestreamError(f"{label} must be positive (got {value})")
    return n


def not_negative(value, label: str) -> int:
    n = whole(value, label)
    if n < 0:
        raise MoestreamError(f"{label} must not be negative (got {value})")
    return n


def size(value, label: str) -> int | None:
    return parse_size(value, label.split("/")[-1])


def context(value, label: str) -> int:
    """-c: a token count, or 0 for min(the model's maximum, DEFAULT_CTX)."""
    return 0 if str(value).strip() == "0" else parse_count(value)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, as taskset / cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def thread_count(value, label: str) -> int:
    """-t N: 0 = torch's default, else 1..the CPUs this process may use (more crashes torch)."""
    n, cpus = whole(value, label), usable_cpus()
    if not 0 <= n <= cpus:
        raise MoestreamError(f"{label} {value} is out of range: this process may use {cpus} CPU"
                             f"{'s' if cpus > 1 else ''}, so use -t 1 to -t {cpus} (or 0 for torch's default)")
    return n


# --- the runtime's settings --------------------------------------------------------------------------
KV_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")
EXPERT_DTYPES = ("auto", "f32", "bf16", "f16", "fp8", "int8", "int4", "int2")  # model/formats.py FORMATS
DTYPES = {"float32": "float32", "fp32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "f16": "float16"}  # --dtype spelling -> torch dtype name


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything a run needs to know; sizes are bytes, None = "no limit / work it out"."""

    model: Path = setting(DEFAULT_MODEL, "-m", "--model", parse=as_path, sweep=False, metavar="DIR",
                          help="Hugging Face Llama 4 checkpoint directory (default: the embedded model).")
    device: str = setting("auto", "--device", help="auto (cuda if present), cpu, cuda, cuda:N.")
    dtype: str = setting("auto", "--dtype", choices=("auto", *DTYPES),
                         help="Compute dtype: auto = the checkpoint's on CUDA, float32 on CPU.")
    ctx_size: int = setting(0, "-c", "--ctx-size", parse=context,
                            help="Context length in tokens: 4096, 32k (=32,000), 32K (=32,768), 1M. 0 = the model's "
                                 f"maximum, at most {DEFAULT_CTX}.")
    threads: int = setting(0, "-t", "--threads", parse=thread_count,
                           help="CPU threads, at most the CPUs this process may use (0 = torch's default).")
    cuda_graphs: bool = setting(True, "--enforce-eager", switch=True, on=False,
                                help="On CUDA, decode op by op instead of replaying each layer's fixed-shape parts as "
                                     "CUDA graphs (as vLLM's flag). A profiled run always decodes op by op.")
    # --- expert offload: placement and budgets ---
    gpu_mem: int | None = setting(None, "--gpu-mem", parse=size,
                                  help="Compute-device budget: resident weights + KV + expert cache, in bytes with a "
                                       "unit (40GiB, 40GB, 512MiB), not a fraction. Default: 90% of free GPU memory; "
                                       "no limit on CPU.")
    cpu_mem: int | None = setting(None, "--cpu-mem", parse=size,
                                  help="Host RAM for routed experts; the rest go to a repacked file on disk (40GiB, "
                                       "512MiB, bytes). Default: 80% of available RAM.")
    expert_cache: int | None = setting(None, "--expert-cache", parse=size,
                                       help="Bytes of expert-cache slots on the device (default: what --gpu-mem leaves).")
    expert_dtype: str = setting("auto", "--expert-dtype", choices=EXPERT_DTYPES,
                                help="How routed experts are stored, moved and multiplied: auto = as the checkpoint "
                                     "has them (fp8 stays fp8; unquantized ones at the compute dtype); int8, int4, int2 "
                                     "and fp8 are quantized once, when experts are placed (and kept in the expert file "
                                     "for the next run), and shrink host RAM, disk and link bytes 2-8x.")
    miss_dtype: str = setting("off", "--miss-dtype", choices=("off", "int4", "int2"),
                              help="Keep a low-bit replica of every offloaded expert in host RAM (HOBBIT-style): a "
                                   "decoded token's cache miss runs from it on the CPU at once while the full expert "
                                   "is fetched for next time. Off by default (it trades exactness for stalls).")
    resident_dtype: str = setting("auto", "--resident-dtype", choices=("auto", "int8", "int4"),
                                  help="The resident attention, shared-expert, dense-MLP and lm_head matrices: auto = "
                                       "the compute dtype; int8 = per-channel int8, half of bf16's bytes (Maverick with "
                                       "int4 experts on a 24 GB GPU); int4 = group-wise 4-bit as the int4 experts, "
                                       "about a quarter (as llama.cpp's Q4_0). Embeddings, norms and routers stay.")
    cpu_experts: str = setting("auto", "--cpu-experts", choices=("auto", "never", "always"),
                               help="Run a missing expert on the CPU instead of fetching it: auto = measured cost model.")
    cache_policy: str = setting("predictive", "--cache-policy", choices=("lru", "lfu", "predictive"),
                                help="Expert-cache eviction policy (predictive: closest to Belady's MIN on our traces).")
    cache_split: str = setting("auto", "--cache-split", choices=("auto", "global", "per-layer"),
                               help="One slot pool for all layers, or an equal share per MoE layer; auto = per-layer "
                                    "when every layer gets a slot.")
    prefetch: int = setting(1, "--prefetch", parse=not_negative,
                            help="Lookahead in MoE layers for speculative expert prefetch; 0 = off.")
    cpu_moe: bool = setting(False, "--cpu-moe", switch=True,
                            help="Keep every layer's routed experts on the CPU and run them there.")
    n_cpu_moe: int = setting(0, "--n-cpu-moe", parse=not_negative,
                             help="Keep the experts of the first N layers on the CPU.")
    expert_dir: Path | None = setting(None, "--expert-dir", parse=as_path, sweep=False, metavar="DIR",
                                      help="Where the repacked disk-tier expert file lives (default: ~/.cache/moestream).")
    repack: bool = setting(True, "--no-repack", switch=True, on=False,
                           help="Read disk-tier experts straight from the checkpoint files.")
    record_routing: Path | None = setting(None, "--record-routing", parse=as_path, sweep=False, metavar="FILE",
                                          help="Write every token's (layer, expert, score) to FILE as JSONL.")
    # --- KV cache tiers ---
    kv_gpu_mem: int | None = setting(None, "--kv-gpu-mem", parse=size,
                                     help="Device bytes for the KV cache; older global-layer KV spills to host RAM beyond "
                                          "it (default: all KV on the device).")
    kv_cpu_mem: int | None = setting(None, "--kv-cpu-mem", parse=size,
                                     help="Host RAM for spilled KV blocks (default: no limit).")
    kv_disk: Path | None = setting(None, "--kv-disk", parse=as_path, sweep=False, metavar="FILE",
                                   help="File for KV blocks beyond --kv-cpu-mem: a new file moestream creates (or its "
                                        "own from a run that died), locked, removed at exit.")
    ubatch: int = setting(512, "-ub", "--ubatch-size", parse=positive, help="Prefill micro-batch in tokens.")
    cache_type_k: str = setting("auto", "-ctk", "--cache-type-k", choices=KV_TYPES,
                                help="KV type for keys: auto = the compute dtype; q8_0 = int8 + per-(token, head) scale.")
    cache_type_v: str = setting("auto", "-ctv", "--cache-type-v", choices=KV_TYPES, help="KV type for values.")
    kv_block: int = setting(256, "--kv-block", parse=positive, help="Tokens per spilled KV block.")
    # --- images ---
    vision: bool = setting(True, "--no-vision", switch=True, on=False, sweep=False,
                           help="Do not load the vision tower of a multimodal checkpoint (Scout's: 1.7 GB in bf16); "
                                "images are then refused.")
    max_images: int = setting(48, "--max-images", parse=positive, sweep=False,
                              help="Most images in one conversation (each costs up to 17 tiles of 144 tokens).")
    profile: Path | None = setting(None, "--profile", parse=as_path, sweep=False, metavar="DIR",
                                   help="Write trace.json (Perfetto), summary.json, routing.jsonl and report.md to DIR.")

    def __post_init__(self):
        if self.profile is not None and self.record_routing is None:  # a profile includes the routing trace
            object.__setattr__(self, "record_routing", self.profile / "routing.jsonl")

    @classmethod
    def build(cls, **values) -> "RuntimeConfig":
        """Parse and check every given setting once (text or values; None = the default)."""
        return build_settings(cls, values)


# --- resolving device and dtype ----------------------------------------------------------------------
def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoestreamError(f"device {device!r} is not a device: use auto, cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoestreamError("device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    return dev


def resolve_dtype(dtype: str, device, checkpoint_dtype):
    """"auto" = the checkpoint's dtype on CUDA, float32 on CPU (CPU bf16 matmuls are slow and inexact)."""
    import torch

    if dtype == "auto":
        return checkpoint_dtype if device.type == "cuda" else torch.float32
    return getattr(torch, DTYPES[dtype])

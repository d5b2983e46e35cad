"""`moestream`: the click group and the options every command shares.

Every command builds one RuntimeConfig from the shared flags and passes it down; a MoestreamError
anywhere becomes one `error: ...` line on stderr and exit status 1.
"""

from __future__ import annotations

import functools
import sys

import click

from ..config import RuntimeConfig
from ..errors import MoestreamError


# (RuntimeConfig.build keyword, click declarations, click settings): one list, so every command
# spells and documents a flag the same way, and `bench` can take comma lists of the same flags.
KV_TYPES = ["auto", "f32", "f16", "bf16", "q8_0"]
RUNTIME_FLAGS = [
    ("path", ("-m", "--model"), dict(type=click.Path(), default=None,
     help="Hugging Face Llama 4 checkpoint directory (default: the embedded model).")),
    ("device", ("--device",), dict(default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")),
    ("dtype", ("--dtype",), dict(default="auto", show_default=True,
     help="auto = checkpoint dtype on CUDA, float32 on CPU; or float32, bfloat16, float16.")),
    ("ctx_size", ("-c", "--ctx-size"), dict(default="0", show_default=True,
     help="Context length in tokens: 4096, 32k (=32,000), 32K (=32,768), 1M. 0 = the model's maximum, at most 8192.")),
    ("threads", ("-t", "--threads"), dict(type=int, default=0,
     help="CPU threads, at most the CPUs this process may use (0 = torch's default).")),
    ("gpu_mem", ("--gpu-mem",), dict(default=None, help="Compute-device budget: resident weights + KV + expert cache "
     "in bytes with a unit (40GiB, 40GB, 512MiB), not a fraction. Default: 90% of free GPU memory; no limit on CPU.")),
    ("cpu_mem", ("--cpu-mem",), dict(default=None, help="Host RAM for routed experts; the rest go to a repacked file "
     "on disk (40GiB, 512MiB, bytes). Default: 80% of available RAM.")),
    ("expert_cache", ("--expert-cache",), dict(default=None,
     help="Bytes of expert-cache slots on the device (default: what --gpu-mem leaves).")),
    ("cpu_experts", ("--cpu-experts",), dict(type=click.Choice(["auto", "never", "always"]), default="auto",
     show_default=True, help="Run a missing expert on the CPU instead of fetching it: auto = measured cost model.")),
    ("cache_policy", ("--cache-policy",), dict(type=click.Choice(["lru", "lfu", "predictive"]), default="predictive",
     show_default=True, help="Expert-cache eviction policy.")),
    ("cache_split", ("--cache-split",), dict(type=click.Choice(["auto", "global", "per-layer"]), default="auto",
     show_default=True, help="One slot pool for all layers, or an equal share per MoE layer; auto = per-layer "
     "when every layer gets a slot.")),
    ("prefetch", ("--prefetch",), dict(type=int, default=1, show_default=True,
     help="Lookahead in MoE layers for speculative expert prefetch; 0 = off.")),
    ("cpu_moe", ("--cpu-moe",), dict(is_flag=True, help="Keep every layer's routed experts on the CPU and run them there.")),
    ("n_cpu_moe", ("--n-cpu-moe",), dict(type=int, default=0, help="Keep the experts of the first N layers on the CPU.")),
    ("expert_dir", ("--expert-dir",), dict(type=click.Path(), default=None,
     help="Where the repacked disk-tier expert file lives (default: ~/.cache/moestream).")),
    ("no_repack", ("--no-repack",), dict(is_flag=True, help="Read disk-tier experts straight from the checkpoint files.")),
    ("record_routing", ("--record-routing",), dict(type=click.Path(dir_okay=False), default=None,
     help="Write every token's (layer, expert, score) to FILE as JSONL.")),
    ("kv_gpu_mem", ("--kv-gpu-mem",), dict(default=None, help="Device bytes for the KV cache; older global-layer KV "
     "spills to host RAM beyond it (default: all KV on the device).")),
    ("kv_cpu_mem", ("--kv-cpu-mem",), dict(default=None, help="Host RAM for spilled KV blocks (default: no limit).")),
    ("kv_disk", ("--kv-disk",), dict(type=click.Path(dir_okay=False), default=None,
     help="File for KV blocks beyond --kv-cpu-mem (truncated at start).")),
    ("ubatch", ("-ub", "--ubatch-size"), dict(type=int, default=512, show_default=True, help="Prefill micro-batch in tokens.")),
    ("cache_type_k", ("-ctk", "--cache-type-k"), dict(type=click.Choice(KV_TYPES), default="auto", show_default=True,
     help="KV type for keys: auto = the compute dtype; q8_0 = int8 + per-(token, head) scale.")),
    ("cache_type_v", ("-ctv", "--cache-type-v"), dict(type=click.Choice(KV_TYPES), default="auto", show_default=True,
     help="KV type for values.")),
    ("kv_block", ("--kv-block",), dict(type=int, default=256, show_default=True, help="Tokens per spilled KV block.")),
    ("profile", ("--profile",), dict(type=click.Path(file_okay=False), default=None,
     help="Write trace.json (Perfetto), summary.json, routing.jsonl and report.md to DIR.")),
]


def build_runtime(values: dict) -> RuntimeConfig:
    """RuntimeConfig from the flags' values (keyed as RUNTIME_FLAGS names them)."""
    values = dict(values)
    values["repack"] = not values.pop("no_repack", False)
    return RuntimeConfig.build(**values)


def runtime_options(fn=None, *, sweep: bool = False):
    """The model, placement and budget flags, spelled as llama.cpp users know them.

    Normally the command gets one `runtime=RuntimeConfig`. With sweep=True (bench) every valued flag
    takes a comma list and the command gets `sweeps={name: [values]}` to build one config per
    combination.
    """
    if fn is None:
        return lambda f: runtime_options(f, sweep=sweep)
    names = [name for name, _, _ in RUNTIME_FLAGS]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in names}
        if sweep:
            lists = {name: (v.split(",") if isinstance(v, str) and name not in ("path", "record_routing", "profile",
                                                                                 "expert_dir", "kv_disk") else [v])
                     for name, v in values.items()}
            return fn(*args, sweeps=lists, **kwargs)
        return fn(*args, runtime=build_runtime(values), **kwargs)

    for name, decls, settings in reversed(RUNTIME_FLAGS):
        settings = dict(settings)
        if sweep and not settings.get("is_flag") and name not in ("path", "record_routing", "profile"):
            choices = settings.pop("type", None)
            settings["type"] = str
            if settings.get("default") is not None:
                settings["default"] = str(settings["default"])
            if isinstance(choices, click.Choice):
                settings["help"] += f" One of {', '.join(choices.choices)}."
            settings["help"] += " A comma list sweeps it."
        wrapper = click.option(*decls, name, **settings)(wrapper)
    return wrapper


def sampling_options(fn):
    """The sampling flags, taken as text and checked by SamplingParams, the one place every way of
    setting them (flags, llm.generate, chat /set and /load) is checked: a bad value is one `error:` line
    (click's own range types print a usage block, and let NaN through)."""
    @click.option("-n", "--n-predict", "max_tokens", default="256", show_default=True,
                  help="Maximum tokens to generate (at least 1).")
    @click.option("--temp", "temperature", default="0.8", show_default=True,
                  help="Sampling temperature (0 = greedy).")
    @click.option("--top-k", "top_k", default="40", show_default=True, help="0 = off.")
    @click.option("--top-p", "top_p", default="0.95", show_default=True, help="In (0, 1]; 1.0 = off.")
    @click.option("--repeat-penalty", "repetition_penalty", default="1.0", show_default=True,
                  help="0.01 to 100; 1.0 = off.")
    @click.option("-s", "--seed", default=None, help="Random seed for reproducible sampling (0 to 2^63-1).")
    @click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-turn tokens.")
    @functools.wraps(fn)
    def wrapper(*args, max_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos, **kwargs):
        from ..model.sampling import SamplingParams

        params = SamplingParams.from_text(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                          repetition_penalty=repetition_penalty, max_tokens=max_tokens,
                                          ignore_eos=ignore_eos)
        return fn(*args, params=params, **kwargs)

    return wrapper


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def one_line(message: str) -> str:
    return " ".join(str(message).split())


class Group(click.Group):
    """Turns MoestreamError into one line and exit status 1, and click's own usage errors (a value
    that is not a number, an unknown flag) into one line too (exit status 2, as click's)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoestreamError as e:
            click.echo(f"error: {one_line(e)}", err=True)
            sys.exit(1)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as e:
            if isinstance(e, NO_ARGS_IS_HELP):  # bare `moestream`: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            click.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moestream")
def cli():
    """Run giant mixture-of-experts Llama 4 models on one GPU (or a CPU)."""


def register(llm):
    """Close the model when the command ends (finish copies, flush the trace) and show its notes."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(llm.close)
    for note in llm.notes:
        click.echo(f"note: {note}", err=True)
    return llm


def load_llm(runtime: RuntimeConfig):
    from ..llm import LLM

    return register(LLM(runtime))


from . import bench as _bench  # noqa: E402,F401  (registers the commands)
from . import chat as _chat  # noqa: E402,F401
from . import plan as _plan  # noqa: E402,F401
from . import report as _report  # noqa: E402,F401
from . import generate as _generate  # noqa: E402,F401

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


def runtime_options(fn):
    """The model, placement and budget flags, spelled as llama.cpp users know them; one RuntimeConfig."""

    @click.option("-m", "--model", "model", type=click.Path(), default=None,
                  help="Hugging Face Llama 4 checkpoint directory (default: the embedded model).")
    @click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
    @click.option("--dtype", default="auto", show_default=True,
                  help="auto = checkpoint dtype on CUDA, float32 on CPU; or float32, bfloat16, float16.")
    @click.option("-c", "--ctx-size", default="0", show_default=True,
                  help="Context length in tokens: 4096, 32k (=32,000), 32K (=32,768), 1M. "
                       "0 = the model's maximum, at most 8192.")
    @click.option("-t", "--threads", type=int, default=0, help="CPU threads (0 = torch's default).")
    @click.option("--gpu-mem", default=None, help="Compute-device budget: resident weights + KV + expert cache "
                  "(40GiB, 40GB, 512MiB, bytes). Default: 90%% of free GPU memory; no limit on CPU.")
    @click.option("--cpu-mem", default=None, help="Host RAM for routed experts; the rest go to a repacked file "
                  "on disk. Default: 80%% of available RAM.")
    @click.option("--expert-cache", default=None, help="Bytes of expert-cache slots on the device "
                  "(default: what --gpu-mem leaves).")
    @click.option("--cpu-experts", type=click.Choice(["auto", "never", "always"]), default="auto", show_default=True,
                  help="Run a missing expert on the CPU instead of fetching it: auto = measured cost model.")
    @click.option("--cache-policy", type=click.Choice(["lru", "lfu", "predictive"]), default="lfu", show_default=True,
                  help="Expert-cache eviction policy.")
    @click.option("--cache-split", type=click.Choice(["auto", "global", "per-layer"]), default="auto", show_default=True,
                  help="One slot pool for all layers, or an equal share per MoE layer; auto = per-layer when "
                       "every layer gets a slot.")
    @click.option("--prefetch", type=int, default=1, show_default=True,
                  help="Lookahead in MoE layers for speculative expert prefetch; 0 = off.")
    @click.option("--cpu-moe", is_flag=True, help="Keep every layer's routed experts on the CPU and run them there.")
    @click.option("--n-cpu-moe", type=int, default=0, help="Keep the experts of the first N layers on the CPU.")
    @click.option("--expert-dir", type=click.Path(), default=None,
                  help="Where the repacked disk-tier expert file lives (default: ~/.cache/moestream).")
    @click.option("--no-repack", is_flag=True, help="Read disk-tier experts straight from the checkpoint files.")
    @click.option("--record-routing", type=click.Path(dir_okay=False), default=None,
                  help="Write every token's (layer, expert, score) to FILE as JSONL.")
    @click.option("--kv-gpu-mem", default=None, help="Device bytes for the KV cache; older global-layer KV spills "
                  "to host RAM beyond it (default: all KV on the device).")
    @click.option("--kv-cpu-mem", default=None, help="Host RAM for spilled KV blocks (default: no limit).")
    @click.option("--kv-disk", type=click.Path(dir_okay=False), default=None,
                  help="File for KV blocks beyond --kv-cpu-mem (truncated at start).")
    @click.option("-ub", "--ubatch-size", "ubatch", type=int, default=512, show_default=True,
                  help="Prefill micro-batch in tokens.")
    @click.option("-ctk", "--cache-type-k", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default="auto",
                  show_default=True, help="KV type for keys: auto = the compute dtype; q8_0 = int8 + per-(token, head) scale.")
    @click.option("-ctv", "--cache-type-v", type=click.Choice(["auto", "f32", "f16", "bf16", "q8_0"]), default="auto",
                  show_default=True, help="KV type for values.")
    @click.option("--kv-block", type=int, default=256, show_default=True, help="Tokens per spilled KV block.")
    @click.option("--profile", "profile", type=click.Path(file_okay=False), default=None,
                  help="Write trace.json (Perfetto), summary.json, routing.jsonl and report.md to DIR.")
    @functools.wraps(fn)
    def wrapper(*args, model, device, dtype, ctx_size, threads, gpu_mem, cpu_mem, expert_cache, cpu_experts,
                cache_policy, cache_split, prefetch, cpu_moe, n_cpu_moe, expert_dir, no_repack, record_routing,
                kv_gpu_mem, kv_cpu_mem, kv_disk, ubatch, cache_type_k, cache_type_v, kv_block, profile, **kwargs):
        runtime = RuntimeConfig.build(
            model, device, dtype, ctx_size if ctx_size != "0" else 0, threads, gpu_mem=gpu_mem, cpu_mem=cpu_mem,
            expert_cache=expert_cache, cpu_experts=cpu_experts, cache_policy=cache_policy, cache_split=cache_split,
            prefetch=prefetch, cpu_moe=cpu_moe, n_cpu_moe=n_cpu_moe, expert_dir=expert_dir, repack=not no_repack,
            record_routing=record_routing, kv_gpu_mem=kv_gpu_mem, kv_cpu_mem=kv_cpu_mem, kv_disk=kv_disk,
            ubatch=ubatch, cache_type_k=cache_type_k, cache_type_v=cache_type_v, kv_block=kv_block, profile=profile)
        return fn(*args, runtime=runtime, **kwargs)

    return wrapper


def sampling_options(fn):
    @click.option("-n", "--n-predict", "max_tokens", type=click.IntRange(min=1), default=256, show_default=True,
                  help="Maximum tokens to generate.")
    @click.option("--temp", "temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
                  help="Sampling temperature (0 = greedy).")
    @click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True, help="0 = off.")
    @click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True, help="1.0 = off.")
    @click.option("--repeat-penalty", "repetition_penalty", type=click.FloatRange(min=0, min_open=True),
                  default=1.0, show_default=True, help="1.0 = off.")
    @click.option("-s", "--seed", type=int, default=None, help="Random seed for reproducible sampling.")
    @click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-turn tokens.")
    @functools.wraps(fn)
    def wrapper(*args, max_tokens, temperature, top_k, top_p, repetition_penalty, seed, ignore_eos, **kwargs):
        from ..model.sampling import SamplingParams

        params = SamplingParams(temperature, top_k, top_p, repetition_penalty, seed, max_tokens, ignore_eos)
        return fn(*args, params=params, **kwargs)

    return wrapper


class Group(click.Group):
    """Turns MoestreamError into one line and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MoestreamError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


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

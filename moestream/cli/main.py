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
    """The model and placement flags, spelled as llama.cpp users know them."""

    @click.option("-m", "--model", "model", type=click.Path(), default=None,
                  help="Hugging Face Llama 4 checkpoint directory (default: the embedded model).")
    @click.option("--device", default="auto", show_default=True, help="auto (cuda if present), cpu, cuda, cuda:N.")
    @click.option("--dtype", default="auto", show_default=True,
                  help="auto = checkpoint dtype on CUDA, float32 on CPU; or float32, bfloat16, float16.")
    @click.option("-c", "--ctx-size", default="0", show_default=True,
                  help="Context length in tokens: 4096, 32k (=32,000), 32K (=32,768), 1M. 0 = the model's maximum.")
    @click.option("-t", "--threads", type=int, default=0, help="CPU threads (0 = torch's default).")
    @functools.wraps(fn)
    def wrapper(*args, model, device, dtype, ctx_size, threads, **kwargs):
        runtime = RuntimeConfig.build(model, device, dtype, ctx_size if ctx_size != "0" else 0, threads)
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


def load_llm(runtime: RuntimeConfig):
    from ..llm import LLM

    llm = LLM(runtime)
    for note in llm.notes:
        click.echo(f"note: {note}", err=True)
    return llm


from . import chat as _chat  # noqa: E402,F401  (registers the commands)
from . import generate as _generate  # noqa: E402,F401

"""The click group every command joins, and the options they share, derived from the settings.

Each option is made from a field's declaration (moestream/config.py `setting`): its flags, help,
choices and default come from there, so every command spells and documents a flag the same way and
`bench` can sweep comma lists of the same flags. Options reach the command as text (None = not
given) and are parsed once by RuntimeConfig.build / SamplingParams.build; a MoestreamError anywhere
becomes one `error: ...` line on stderr and exit status 1.

Subcommand modules import this module; cli/main.py imports them all (no circle).
"""

from __future__ import annotations

import functools
import sys

import click

from .. import config
from ..config import RuntimeConfig, settings_of
from ..errors import MoestreamError
from ..model.sampling import SamplingParams

METAVARS = {config.size: "SIZE", config.context: "N", config.positive: "N", config.not_negative: "N",
            config.thread_count: "N"}  # what each kind of value looks like in --help
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def one_line(message) -> str:
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


def options(cls, sweep: bool = False):
    """click options for every declared setting of `cls`, applied to a command function.

    Values reach the wrapper as text, None when not given (so defaults live only in the declaration).
    With sweep=True a setting that allows it takes a comma list."""

    def decorate(fn):
        for name, default, s in reversed(settings_of(cls)):
            help_text = s.help
            if sweep and s.sweep and not s.switch:
                help_text += " A comma list sweeps it."
            if s.switch:
                fn = click.option(*s.flags, name, flag_value=s.on, default=None, help=help_text)(fn)
                continue
            if default is not None and name != "model":
                help_text += f"  [default: {default}]"
            metavar = s.metavar or ("[" + "|".join(s.choices) + "]" if s.choices else METAVARS.get(s.parse, "VALUE"))
            fn = click.option(*s.flags, name, default=None, metavar=metavar, help=help_text)(fn)
        return fn

    return decorate


def runtime_options(fn=None, *, sweep: bool = False):
    """The model, placement and budget flags, spelled as llama.cpp users know them.

    The command gets `runtime=RuntimeConfig`; with sweep=True (bench) it gets `sweeps={name: [values]}`
    (a comma list per sweepable setting that was given) to build one config per combination."""
    if fn is None:
        return lambda f: runtime_options(f, sweep=sweep)
    declared = {name: s for name, _, s in settings_of(RuntimeConfig)}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in declared}
        if sweep:
            lists = {name: (v.split(",") if declared[name].sweep and isinstance(v, str) else [v])
                     for name, v in values.items() if v is not None}
            return fn(*args, sweeps=lists, **kwargs)
        return fn(*args, runtime=RuntimeConfig.build(**values), **kwargs)

    return options(RuntimeConfig, sweep)(wrapper)


def sampling_options(fn):
    """The sampling flags, checked by SamplingParams (the one place flags, llm.generate, chat /set and
    /load are all checked): a bad value is one `error:` line."""
    declared = [name for name, _, _ in settings_of(SamplingParams)]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        params = SamplingParams.build(**{name: kwargs.pop(name) for name in declared})
        return fn(*args, params=params, **kwargs)

    return options(SamplingParams)(wrapper)


def register(llm):
    """Close the model when the command ends (finish copies, flush the trace) and show its notes."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(llm.close)
    for note in llm.notes:
        click.echo(f"note: {note}", err=True)
    return llm


def load_llm(runtime: RuntimeConfig, **kwargs):
    from ..llm import LLM

    return register(LLM(runtime, **kwargs))

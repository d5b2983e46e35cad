"""Hostile input through the real command line: every command answers with one `error:` line.

Each case runs `python -m moestream ...` in a subprocess and asserts a non-zero exit status, exactly
one line on stderr that starts with `error:` and says what is wrong, and no traceback. Most cases
fail before torch is imported, so the table stays quick. Then a newcomer's first steps: `-m FILE`,
`-m org/name`, and help that never waits for torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moestream.config import DEFAULT_MODEL

CPUS = len(os.sched_getaffinity(0))


def run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "moestream", *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def config_with(**changes) -> dict:
    """The embedded model's config.json with some fields replaced (None removes the field)."""
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    return config


GOOD_SUMMARY_KEYS = {"model": "m", "device": "cpu", "dtype": "float32", "tokens": {"prefill": 1, "decode": 1},
                     "prefill_tps": 1.0, "decode_tps": 1.0, "latency_ms": {"mean": 1, "p50": 1, "p90": 1, "p99": 1},
                     "hit_rate": 0.5, "prefetch_recall": {}, "prefetch_precision": {},
                     "bytes_per_token": {"host_to_device": 0, "disk_to_host": 0}, "stall_fraction": 0,
                     "cpu_runs": 0, "cpu_expert_seconds": 0, "kv_tokens": {"device": 1, "host": 0, "disk": 0},
                     "peak_memory": {"cuda_bytes": None, "host_rss_bytes": 1}, "series": []}
HEADER = {"format": "moestream-routing/1", "model": "m", "moe_layers": [0, 1], "num_experts": 4, "top_k": 1,
          "expert_bytes": 1000}
RECORD = {"step": 0, "layer": 0, "experts": [[1]], "scores": [[1.0]]}

# name -> file content (dict/list: JSON; str: text; bytes: raw), written under a per-module directory
FILES = {
    "configs/list/config.json": [config_with()],
    "configs/experts_word/config.json": config_with(num_local_experts="sixteen"),
    "configs/topk0/config.json": config_with(num_experts_per_tok=0),
    "configs/topk_too_many/config.json": config_with(num_experts_per_tok=17),
    "configs/hidden0/config.json": config_with(hidden_size=0),
    "configs/layers_negative/config.json": config_with(num_hidden_layers=-8),
    "configs/heads/config.json": config_with(num_attention_heads=5, num_key_value_heads=2),
    "configs/moe_out_of_range/config.json": config_with(moe_layers=[0, 1, 99]),
    "configs/moe_words/config.json": config_with(moe_layers=["first"]),
    "configs/moe_twice/config.json": config_with(moe_layers=[0, 0, 1]),
    "configs/nope_interval0/config.json": config_with(no_rope_layers=None, no_rope_layer_interval=0),
    "configs/nope_short/config.json": config_with(no_rope_layers=[1, 0]),
    "configs/qk_norm_text/config.json": config_with(use_qk_norm="yes"),
    "configs/text_config_list/config.json": {"architectures": ["Llama4ForConditionalGeneration"], "text_config": [1, 2]},
    "configs/rope_theta_nan/config.json": config_with(rope_parameters={"rope_type": "default", "rope_theta": -1}),
    "profiles/list/summary.json": [1, 2, 3],
    "profiles/missing/summary.json": {"model": "m"},
    "profiles/types/summary.json": {**GOOD_SUMMARY_KEYS, "latency_ms": {"mean": "fast", "p50": 1, "p90": 1, "p99": 1}},
    "profiles/series/summary.json": {**GOOD_SUMMARY_KEYS, "series": [{"kind": "decode"}]},
    "traces/header_only.jsonl": json.dumps(HEADER) + "\n",
    "traces/empty.jsonl": "",
    "traces/bad_record.jsonl": json.dumps(HEADER) + "\n" + json.dumps(RECORD) + "\n" + '{"step": 1, "layer": 0}\n',
    "traces/expert_out_of_range.jsonl": json.dumps(HEADER) + "\n" + json.dumps({**RECORD, "experts": [[9]]}) + "\n",
    "traces/truncated.jsonl": json.dumps(HEADER) + "\n" + json.dumps(RECORD)[:20] + "\n",
    "traces/header_list.jsonl": json.dumps([HEADER]) + "\n" + json.dumps(RECORD) + "\n",
    "traces/header_no_layers.jsonl": json.dumps({**HEADER, "moe_layers": []}) + "\n" + json.dumps(RECORD) + "\n",
    "traces/good.jsonl": json.dumps(HEADER) + "\n" + json.dumps(RECORD) + "\n",
    "model.gguf": b"GGUF\x03\x00\x00\x00" + b"\x00" * 64,
    "llama-magic.bin2": b"GGUF\x03\x00\x00\x00" + b"\x00" * 64,
    "notes.txt": "not a model\n",
}

# (case id, argv with {d} for that directory, what the one line must say)
CASES = [
    # -- numeric flags of every command
    ("threads-huge", ["generate", "-p", "hi", "-t", "10000"], f"this process may use {CPUS} CPU"),
    ("threads-negative", ["plan", "-t", "-1"], "-t/--threads -1 is out of range"),
    ("threads-bench", ["bench", "-t", "10000", "-p", "4", "-n", "0", "-r", "1"], f"use -t 1 to -t {CPUS}"),
    ("threads-word", ["plan", "-t", "many"], "-t/--threads 'many' is not a whole number"),
    ("gpu-mem-fraction", ["plan", "--gpu-mem", "0.9"], "budgets are bytes with a unit: use e.g. 40GiB or 512MiB"),
    ("gpu-mem-fraction-generate", ["generate", "-p", "hi", "--gpu-mem", "0.9"], "looks like a fraction"),
    ("gpu-mem-half-byte", ["plan", "--gpu-mem", "1.5"], "is not a whole number of bytes"),
    ("cpu-mem-fractional-bytes", ["plan", "--cpu-mem", "1.0001KB"], "is not a whole number of bytes"),
    ("link-negative", ["plan", "--link-gbps", "-5"], "--link-gbps -5.0 is not a positive finite number"),
    ("link-nan", ["plan", "--link-gbps", "nan"], "is not a positive finite number"),
    ("link-inf", ["plan", "--link-gbps", "inf"], "is not a positive finite number"),
    ("disk-zero", ["plan", "--disk-gbps", "0"], "--disk-gbps 0.0 is not a positive finite number"),
    ("kv-block-0", ["plan", "--kv-block", "0"], "--kv-block must be positive"),
    ("ubatch-0", ["generate", "-p", "hi", "-ub", "0"], "-ub/--ubatch-size must be positive"),
    ("prefetch-past-the-layers", ["plan", "--prefetch", "99"], "use --prefetch 7 or less"),
    ("prefetch-generate", ["generate", "-p", "hi", "--prefetch", "99", "--expert-cache", "3MiB"], "--prefetch 99"),
    ("n-cpu-moe-negative", ["plan", "--n-cpu-moe", "-1"], "--n-cpu-moe must not be negative"),
    ("ctx-half", ["generate", "-p", "hi", "-c", "0.5"], "is not a whole number of tokens"),
    ("ctx-fraction", ["plan", "-c", "1.5"], "is not a whole number of tokens"),
    ("bench-layers-0", ["bench", "--synthetic", "tiny", "--layers", "0"], "0 is not in the range x>=1"),
    ("bench-layers-alone", ["bench", "--layers", "3", "-p", "4", "-n", "0"], "--layers only applies to --synthetic"),
    ("bench-reps-0", ["bench", "-r", "0"], "0 is not in the range x>=1"),
    ("bench-ctx-too-small", ["bench", "-p", "64", "-n", "8", "-r", "1", "-c", "16"], "the longest needs 66 tokens (depth + prompt + generated + 2): use -c 66 or more"),
    ("bench-sweep-bad-late", ["bench", "-p", "4", "-n", "0", "-r", "1", "--kv-block", "16,0"], "--kv-block must be positive"),
    ("unknown-flag", ["plan", "--gpu-memory-utilization", "0.9"], "No such option"),
    # -- malformed config.json (plan reads it without weights)
    ("config-list", ["plan", "-m", "{d}/configs/list"], "holds a JSON list, not an object"),
    ("config-experts-word", ["plan", "-m", "{d}/configs/experts_word"], 'num_local_experts must be a whole number >= 1 (got "sixteen")'),
    ("config-topk-0", ["plan", "-m", "{d}/configs/topk0"], "num_experts_per_tok must be a whole number >= 1"),
    ("config-topk-too-many", ["plan", "-m", "{d}/configs/topk_too_many"], "num_experts_per_tok must be at most num_local_experts (16)"),
    ("config-hidden-0", ["plan", "-m", "{d}/configs/hidden0"], "hidden_size must be a whole number >= 1 (got 0)"),
    ("config-layers-negative", ["plan", "-m", "{d}/configs/layers_negative"], "num_hidden_layers must be"),
    ("config-heads", ["plan", "-m", "{d}/configs/heads"], "num_key_value_heads must be a divisor of num_attention_heads (5)"),
    ("config-moe-range", ["plan", "-m", "{d}/configs/moe_out_of_range"], "moe_layers must be a list of distinct layer numbers in 0..7"),
    ("config-moe-words", ["plan", "-m", "{d}/configs/moe_words"], "moe_layers must be"),
    ("config-moe-twice", ["plan", "-m", "{d}/configs/moe_twice"], "moe_layers must be a list of distinct"),
    ("config-nope-interval-0", ["plan", "-m", "{d}/configs/nope_interval0"], "no_rope_layer_interval must be"),
    ("config-nope-short", ["plan", "-m", "{d}/configs/nope_short"], "no_rope_layers must be a list of 8 entries"),
    ("config-qk-norm-text", ["plan", "-m", "{d}/configs/qk_norm_text"], "use_qk_norm must be true or false"),
    ("config-text-config-list", ["plan", "-m", "{d}/configs/text_config_list"], "text_config must be a JSON object"),
    ("config-rope-theta", ["plan", "-m", "{d}/configs/rope_theta_nan"], "rope_theta must be a positive number"),
    ("config-generate", ["generate", "-p", "hi", "-m", "{d}/configs/heads"], "num_key_value_heads must be a divisor"),
    # -- moestream report on a summary.json of the wrong structure
    ("report-list", ["report", "{d}/profiles/list"], "the file is not a JSON object"),
    ("report-missing", ["report", "{d}/profiles/missing"], "device is missing"),
    ("report-types", ["report", "{d}/profiles/types"], "latency_ms.mean is not a number"),
    ("report-series", ["report", "{d}/profiles/series"], "series[0].ms is missing"),
    # -- moestream bench replay on bad traces
    ("replay-header-only", ["bench", "replay", "{d}/traces/header_only.jsonl"], "holds a header but no routing records"),
    ("replay-empty", ["bench", "replay", "{d}/traces/empty.jsonl"], "is empty, not a moestream routing trace"),
    ("replay-bad-record", ["bench", "replay", "{d}/traces/bad_record.jsonl"], "line 3 has experts that are not lists"),
    ("replay-expert-range", ["bench", "replay", "{d}/traces/expert_out_of_range.jsonl"], "expert numbers in 0..3"),
    ("replay-truncated", ["bench", "replay", "{d}/traces/truncated.jsonl"], "line 2 is not valid JSON"),
    ("replay-header-list", ["bench", "replay", "{d}/traces/header_list.jsonl"], "its first line is not a moestream-routing/1 header"),
    ("replay-header-no-layers", ["bench", "replay", "{d}/traces/header_no_layers.jsonl"], "moe_layers is not a list"),
    ("replay-slots-0", ["bench", "replay", "{d}/traces/good.jsonl", "--slots", "0"], "needs at least 1 slot"),
    ("replay-cache-too-small", ["bench", "replay", "{d}/traces/good.jsonl", "--expert-cache", "10"], "holds no expert"),
    ("replay-link-nan", ["bench", "replay", "{d}/traces/good.jsonl", "--link-gbps", "nan"], "--link-gbps nan is not a positive"),
    ("replay-ms-negative", ["bench", "replay", "{d}/traces/good.jsonl", "--layer-ms", "-1"], "--layer-ms -1.0 is not a time"),
    # -- -m that is not a checkpoint directory
    ("model-gguf-name", ["generate", "-p", "hi", "-m", "{d}/model.gguf"], "is a GGUF file, which moestream does not read"),
    ("model-gguf-magic", ["plan", "-m", "{d}/llama-magic.bin2"], "is a GGUF file"),
    ("model-file", ["generate", "-p", "hi", "-m", "{d}/notes.txt"], "is a file: -m takes a checkpoint directory"),
    ("model-repo-id", ["generate", "-p", "hi", "-m", "meta-llama/Llama-4-Scout-17B-16E-Instruct"],
     "hf download meta-llama/Llama-4-Scout-17B-16E-Instruct --local-dir DIR, then -m DIR"),
    ("model-repo-id-plan", ["plan", "-m", "org/name"], "download it first: hf download org/name --local-dir DIR"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    for name, content in FILES.items():
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content)
        else:
            path.write_text(json.dumps(content))
    return d


def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("args,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_error_line(files, args, message):
    r = run(*[a.replace("{d}", str(files)) for a in args])
    lines = r.stderr.splitlines()
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert message in lines[0], lines[0]


def test_a_good_trace_still_replays(files):
    r = run("bench", "replay", str(files / "traces" / "good.jsonl"), "--slots", "1")
    assert r.returncode == 0, r.stderr
    assert "Belady MIN" in r.stdout


def test_the_generate_context_message_fits_the_command():
    """generate has no conversation to clear: its overflow advice is its own."""
    r = run("generate", "-p", "word " * 40, "-c", "16", "-n", "4")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "shorten the prompt or raise -c" in r.stderr and "/clear" not in r.stderr


# --- a newcomer's first steps ---------------------------------------------------------------------
HELP_WITHOUT_TORCH = """
import sys
import click
from moestream.cli.main import cli

def helps(command, ctx):
    command.get_help(ctx)
    for name, sub in getattr(command, "commands", {}).items():
        helps(sub, click.Context(sub, info_name=name, parent=ctx))

helps(cli, click.Context(cli, info_name="moestream"))
assert "torch" not in sys.modules, "building the help imported torch"
print("ok")
"""


def test_help_never_imports_torch():
    """`moestream --help` took 4-13 s: torch is imported only by the commands that run a model."""
    r = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    for args in (["--help"], ["plan", "--help"], ["bench", "replay", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "moestream", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr
        assert not any(line.rstrip().endswith("| torch") for line in r.stderr.splitlines()), f"{args} imported torch"


def test_help_shows_percent_signs_once():
    for command in ("generate", "chat", "plan", "bench"):
        out = run(command, "--help").stdout
        assert "%%" not in out, command
    out = run("generate", "--help").stdout
    assert "90% of free GPU memory" in " ".join(out.split()) and "80% of available RAM" in " ".join(out.split())


def test_import_moestream_is_light_until_load_is_used():
    code = ("import sys, moestream; assert 'torch' not in sys.modules; "
            "from moestream import load, LLM, MoestreamError; assert 'torch' in sys.modules and callable(load)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_safetensors_file_points_at_its_directory(tmp_path):
    """-m model.safetensors (a file inside a checkpoint): the fix is the directory around it."""
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    r = run("generate", "-p", "hi", "-m", str(tmp_path / "model.safetensors"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert f"e.g. -m {tmp_path}" in r.stderr


def test_a_missing_directory_that_is_not_a_repo_id_says_so(tmp_path):
    r = run("generate", "-p", "hi", "-m", str(tmp_path / "nowhere"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "hf download" not in r.stderr

"""`moestream plan`: checked against figures computed by hand from the reference sizes."""

import json
import re
import subprocess
import sys

import pytest


def plan(*args, code=0):
    """The --json report; exit status 0 when it fits, 1 when it does not."""
    r = plan_text("--json", *args)
    assert r.returncode == code, r.stderr
    return json.loads(r.stdout)


def plan_text(*args):
    """The real command, in this process (one torch import for the whole file): stdout, stderr, status."""
    from click.testing import CliRunner

    from moestream.cli.main import cli

    r = CliRunner(env={"COLUMNS": "250"}).invoke(cli, ["plan", *args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(["moestream", "plan", *args], r.exit_code, r.stdout, r.stderr)


def test_scout_on_one_h100_at_1m_context():
    r = plan("--preset", "scout", "--gpu-mem", "80GiB", "--cpu-mem", "120GiB", "-c", "1M")
    expert = 3 * 5120 * 8192 * 2  # 251.7 MB
    assert r["expert_bytes"] == expert and abs(expert / 1e6 - 251.7) < 0.1
    # resident: 2 x vocab x D (embeddings + lm_head) + 48 x (attention + norms + router + shared expert)
    layer = (5120 + 2 * 1024) * 5120 + 5120 * 5120 + 2 * 5120 + 16 * 5120 + 3 * 8192 * 5120
    resident = (2 * 202048 * 5120 + 5120 + 48 * layer) * 2
    assert r["gpu"]["resident_bytes"] == resident and abs(resident / 1e9 - 22.27) < 0.01
    # KV: 4096 B per token per layer; 12 global layers x 1,048,576 tokens + 36 chunked layers x 8192
    assert r["context"] == 2**20 and r["kv"]["bytes_per_token_per_layer"] == 4096
    assert r["kv"]["total_bytes_at_context"] == 4096 * (12 * 2**20 + 36 * 8192)
    assert r["gpu"]["kv_bytes"] == r["kv"]["total_bytes_at_context"]  # no --kv-gpu-mem: all on the GPU
    free = 80 * 2**30 - resident - r["gpu"]["kv_bytes"] - r["gpu"]["workspace_bytes"]
    assert r["gpu"]["expert_cache_slots"] == free // expert
    assert r["host"]["experts_in_ram"] == 120 * 2**30 // expert
    assert r["host"]["experts_on_disk"] == 768 - r["host"]["experts_in_ram"]
    assert r["fits"] and r["gpu"]["total_bytes"] <= 80 * 2**30
    # all-miss ceiling: 48 experts per token over a 50 GB/s link, and the share of them on disk
    # (256 of 768) read at 7 GB/s first: 12.08 GB / 50 GB/s + 4.03 GB / 7 GB/s = 0.817 s, 1.22 tok/s
    on_disk = r["host"]["experts_on_disk"] / 768
    assert r["host"]["experts_on_disk"] == 256 and r["decode_ceiling"]["disk_gbps"] == 7
    assert r["decode_ceiling"]["bytes_per_token_from_disk"] == pytest.approx(48 * expert * on_disk)
    assert r["decode_ceiling"]["tokens_per_s"] == pytest.approx(1 / (48 * expert / 50e9 + 48 * expert * on_disk / 7e9))
    assert abs(r["decode_ceiling"]["tokens_per_s"] - 1.22) < 0.01
    assert 2**20 <= r["largest_context_that_fits"] < 10485760


def test_maverick_fp8_and_the_ceiling():
    r = plan("--preset", "maverick", "--gpu-mem", "80GiB", "--cpu-mem", "400GiB", "-c", "128K", "--expert-dtype", "fp8")
    assert r["moe_layers"] == 24 and r["experts_per_layer"] == 128
    fp8 = 3 * 5120 * 8192 + 4 * (2 * 8192 + 5120)  # a byte a weight + one fp32 scale per output channel
    assert r["expert_bytes"] == fp8
    assert abs(r["decode_ceiling"]["tokens_per_s"] - 50e9 / (24 * fp8)) < 1e-9  # 16.5 tok/s


def test_does_not_fit_says_what_to_change_and_how_to_go_distributed():
    r = plan("--preset", "maverick", "--gpu-mem", "24GiB", "--cpu-mem", "64GiB", "-c", "32k", code=1)
    assert not r["fits"] and r["problems"] and r["advice"]
    assert not r["one_node"]
    d = r["distributed"]
    assert d["vllm"].startswith("vllm serve meta-llama/Llama-4-Maverick-17B-128E-Instruct --tensor-parallel-size")
    assert "--enable-expert-parallel" in d["vllm"] and "--ep-size" in d["sglang"] and d["gpus"] >= 2


def test_kv_spill_makes_a_long_context_fit():
    tight = plan("--preset", "scout", "--gpu-mem", "40GiB", "--cpu-mem", "200GiB", "-c", "1M", code=1)
    assert not tight["fits"]
    spill = plan("--preset", "scout", "--gpu-mem", "40GiB", "--cpu-mem", "200GiB", "-c", "1M", "--kv-gpu-mem", "4GiB",
                 "-ctk", "q8_0", "-ctv", "q8_0")
    assert spill["fits"] and spill["kv"]["k_type"] == "q8_0"
    assert spill["gpu"]["kv_bytes"] <= 4 * 2**30


def test_plan_reads_config_json_without_weights(tmp_path):
    from moestream.config import DEFAULT_MODEL

    (tmp_path / "config.json").write_text((DEFAULT_MODEL / "config.json").read_text())
    r = plan("-m", str(tmp_path), "--gpu-mem", "1GiB", "--cpu-mem", "1GiB")
    assert r["fits"] and r["layers"] == 8


@pytest.mark.parametrize("args,message", [
    (["--preset", "scout", "--gpu-mem", "lots"], "is not a size"),
    (["--preset", "scout", "--gpu-mem", "-4GiB"], "is not a size"),
    (["--preset", "maverick", "-c", "2M"], "exceeds this model's maximum of 1048576"),
    (["-m", "/nonexistent"], "needs config.json"),
])
def test_bad_plan_input_is_one_line(args, message):
    r = subprocess.run([sys.executable, "-m", "moestream", "plan", *args], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stderr and r.stderr.strip().count("\n") == 0


def test_maverick_ceiling_when_every_expert_is_in_ram():
    r = plan("--preset", "maverick", "--gpu-mem", "80GiB", "--cpu-mem", "400GiB", "-c", "128K", "--expert-dtype", "fp8",
             "--disk-gbps", "1")
    assert r["host"]["experts_on_disk"] == 0 and r["decode_ceiling"]["bytes_per_token_from_disk"] == 0
    fp8 = 3 * 5120 * 8192 + 4 * (2 * 8192 + 5120)
    assert r["decode_ceiling"]["tokens_per_s"] == pytest.approx(50e9 / (24 * fp8))  # the disk plays no part


def test_disk_bandwidth_prices_the_misses_of_experts_on_disk():
    args = ("--preset", "scout", "--gpu-mem", "80GiB", "--cpu-mem", "60GiB", "-c", "32k")
    fast, slow = plan(*args, "--disk-gbps", "14"), plan(*args, "--disk-gbps", "3.5", "--link-gbps", "25")
    expert = 3 * 5120 * 8192 * 2
    on_disk = fast["host"]["experts_on_disk"] / 768
    assert on_disk == (768 - 60 * 2**30 // expert) / 768 > 0.5
    for r, link, disk in ((fast, 50e9, 14e9), (slow, 25e9, 3.5e9)):
        assert r["decode_ceiling"]["tokens_per_s"] == pytest.approx(1 / (48 * expert / link + 48 * expert * on_disk / disk))
        assert r["decode_ceiling"]["disk_gbps"] * 1e9 == disk
    out = plan_text(*args).stdout
    assert "read from disk at 7 GB/s first" in out


def test_no_expert_slot_is_said_plainly_not_fits():
    """The GPU holds the resident weights and KV but not one expert: it runs, every expert on the CPU."""
    args = ("--preset", "scout", "--gpu-mem", "21.5GiB", "--cpu-mem", "100GiB", "-c", "1000")
    r = plan(*args)
    assert r["gpu"]["expert_cache_slots"] == 0 and r["fits"]
    assert r["experts_run_on_cpu"] and r["verdict"] == "fits, every routed expert on the CPU"
    assert any("one expert-cache slot" in a and "--gpu-mem" in a for a in r["advice"])
    t = plan_text(*args)
    assert t.returncode == 0
    lines = t.stdout.splitlines()
    assert "runs, but no expert-cache slot fits on the GPU: every routed expert would run on the CPU" in lines
    assert "fits" not in lines  # never a plain "fits"
    assert "all-miss decode ceiling" not in t.stdout  # no expert crosses the link


def test_weights_that_do_not_fit_get_advice_about_the_weights_not_kv():
    r = plan("--preset", "maverick", "--gpu-mem", "24GiB", "--cpu-mem", "64GiB", "-c", "32k", code=1)
    assert not r["gpu"]["weights_fit"]
    text = " ".join(r["advice"] + r["problems"])
    assert "-ctk" not in text and "--kv-gpu-mem" not in text and "-c " not in text.replace("-c 32000", "")
    assert r["advice"][0].startswith("more --gpu-mem: the resident weights and workspace alone need")
    t = plan_text("--preset", "maverick", "--gpu-mem", "24GiB", "--cpu-mem", "64GiB", "-c", "32k")
    assert t.returncode == 1 and "--tensor-parallel-size" in t.stdout and "-ctk" not in t.stdout


def test_kv_that_does_not_fit_still_gets_kv_advice():
    r = plan("--preset", "scout", "--gpu-mem", "40GiB", "--cpu-mem", "200GiB", "-c", "1M", code=1)
    assert r["gpu"]["weights_fit"] and any("--kv-gpu-mem" in a for a in r["advice"])


def test_nothing_fits_exits_1_in_text_and_json():
    args = ("--preset", "scout", "--gpu-mem", "16GiB", "--cpu-mem", "64GiB")
    r = plan(*args, code=1)  # the JSON is printed whole before the exit status says no
    assert not r["fits"] and r["verdict"] == "does not fit"
    t = plan_text(*args)
    assert t.returncode == 1 and "does not fit" in t.stdout and "Traceback" not in t.stderr
    assert "1 when it does not" in plan_text("--help").stdout


@pytest.mark.parametrize("gpu,cpu,gpu_figure,host_figure", [
    ("80GiB", "120GiB", "20.74 GiB", "120.00 GiB"),
    ("80GB", "120GB", "22.27 GB", "119.79 GB"),
    ("80GiB", "120GB", "20.74 GiB", "119.79 GB"),
])
def test_budgets_are_shown_in_the_units_they_were_typed_in(gpu, cpu, gpu_figure, host_figure):
    t = plan_text("--preset", "scout", "--gpu-mem", gpu, "--cpu-mem", cpu, "-c", "1M")
    out = t.stdout
    spaced = lambda typed: re.sub(r"(\d)([A-Za-z])", r"\1 \2", typed)  # noqa: E731  80GiB reads back "80 GiB"
    assert f"total of --gpu-mem {spaced(gpu)}" in out and f"of --cpu-mem {spaced(cpu)}" in out
    gpu_rows = [line for line in out.splitlines() if line.startswith("│ GPU")]
    assert gpu_figure in gpu_rows[0]  # resident weights, in the family of --gpu-mem
    binary = gpu.endswith("iB")
    assert all((" GiB" in row or " MiB" in row) == binary for row in gpu_rows if "0 B" not in row)
    host_row = next(line for line in out.splitlines() if line.startswith("│ host RAM"))
    assert host_figure in host_row
    r = plan("--preset", "scout", "--gpu-mem", gpu, "--cpu-mem", cpu, "-c", "1M")
    assert r["gpu"]["budget_text"].replace(" ", "") == gpu and r["host"]["budget_text"].replace(" ", "") == cpu


def test_a_budget_message_keeps_the_typed_units():
    """72GB is below what Scout needs at 1M: the message must not compare "72 GB" with a GiB figure."""
    r = plan("--preset", "scout", "--gpu-mem", "72GB", "--cpu-mem", "200GB", "-c", "1M", code=1)
    assert r["problems"][0].startswith("--gpu-mem 72 GB is below the 75.56 GB")


def test_json_keeps_every_key_it_had():
    r = plan("--preset", "maverick", "--gpu-mem", "24GiB", "--cpu-mem", "64GiB", code=1)
    assert {"model", "layers", "moe_layers", "experts_per_layer", "top_k", "expert_dtype", "expert_bytes", "context",
            "max_context", "largest_context_that_fits", "gpu", "host", "kv", "decode_ceiling", "fits", "problems",
            "advice", "assumed", "one_node", "distributed"} <= set(r)
    assert {"budget", "resident_bytes", "kv_bytes", "workspace_bytes", "expert_cache_slots",
            "expert_cache_slots_per_layer", "expert_cache_bytes", "total_bytes"} <= set(r["gpu"])
    assert {"budget", "experts_in_ram", "experts_on_disk", "expert_ram_bytes", "expert_disk_bytes"} <= set(r["host"])
    assert {"k_type", "v_type", "bytes_per_token_per_layer", "global_layers", "total_bytes_at_context",
            "device_tokens_per_global_layer", "host_tokens_per_global_layer", "disk"} <= set(r["kv"])
    assert {"link_gbps", "bytes_per_token_all_miss", "tokens_per_s"} <= set(r["decode_ceiling"])
    assert {"gpus", "vllm", "sglang"} <= set(r["distributed"])

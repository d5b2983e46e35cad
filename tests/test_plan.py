"""`moestream plan`: checked against figures computed by hand from the reference sizes."""

import json
import subprocess
import sys

import pytest


def plan(*args):
    r = subprocess.run([sys.executable, "-m", "moestream", "plan", "--json", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


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
    assert abs(r["decode_ceiling"]["tokens_per_s"] - 50e9 / (48 * expert)) < 1e-9  # 4.14 tok/s
    assert 2**20 <= r["largest_context_that_fits"] < 10485760


def test_maverick_fp8_and_the_ceiling():
    r = plan("--preset", "maverick", "--gpu-mem", "80GiB", "--cpu-mem", "400GiB", "-c", "128K", "--expert-dtype", "fp8")
    assert r["moe_layers"] == 24 and r["experts_per_layer"] == 128
    assert r["expert_bytes"] == 3 * 5120 * 8192
    assert abs(r["decode_ceiling"]["tokens_per_s"] - 50e9 / (24 * 3 * 5120 * 8192)) < 1e-9  # 16.6 tok/s


def test_does_not_fit_says_what_to_change_and_how_to_go_distributed():
    r = plan("--preset", "maverick", "--gpu-mem", "24GiB", "--cpu-mem", "64GiB", "-c", "32k")
    assert not r["fits"] and r["problems"] and r["advice"]
    assert not r["one_node"]
    d = r["distributed"]
    assert d["vllm"].startswith("vllm serve meta-llama/Llama-4-Maverick-17B-128E-Instruct --tensor-parallel-size")
    assert "--enable-expert-parallel" in d["vllm"] and "--ep-size" in d["sglang"] and d["gpus"] >= 2


def test_kv_spill_makes_a_long_context_fit():
    tight = plan("--preset", "scout", "--gpu-mem", "40GiB", "--cpu-mem", "200GiB", "-c", "1M")
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

"""Lazy expert reads, and one clear line for every kind of broken checkpoint."""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import moestream
from moestream import MoestreamError
from moestream.model.checkpoint import Checkpoint

from .conftest import VOCAB


def test_loading_reads_no_expert(tiny):
    llm = moestream.load(tiny("scout")[0])
    assert llm.checkpoint.expert_reads == 0
    assert llm.stats().experts.resident == 0


def test_a_benchmark_places_every_expert_first_and_the_logits_do_not_change(tiny):
    lazy, placed = moestream.load(tiny("maverick")[0]), moestream.load(tiny("maverick")[0])
    placed.experts.place_all()  # what `moestream bench` does before it times anything
    n = len(placed.config.moe_layers) * placed.config.num_local_experts
    assert placed.checkpoint.expert_reads == placed.stats().experts.resident == n
    assert torch.equal(placed.logits([5, 9, 2]), lazy.logits([5, 9, 2]))
    assert placed.checkpoint.expert_reads == n  # nothing read again


def test_one_token_reads_only_the_chosen_experts(tiny):
    llm = moestream.load(tiny("maverick")[0])
    chosen = []
    llm.model.on_route = lambda record: chosen.extend((record[0], e) for e in record[1].flatten().tolist())
    llm.logits([5])
    assert len(chosen) == len(llm.config.moe_layers)  # top-1, one token: one expert per MoE layer
    assert llm.checkpoint.expert_reads == len(chosen)
    assert set(llm.experts.loaded) == set(chosen)
    # the same token again: everything it needs is resident, nothing more is read
    reads = llm.checkpoint.expert_reads
    llm.logits([5])
    assert llm.checkpoint.expert_reads == reads
    assert llm.stats().experts.gets == 2 * reads


def test_expert_read_is_a_slice_not_the_fused_tensor(tiny, monkeypatch):
    """read_expert goes through get_slice()[e]; the whole fused [E, D, 2F] tensor is never loaded."""
    ckpt = Checkpoint(tiny("scout")[0])
    loaded = []
    real_read, real_raw = Checkpoint.read, Checkpoint._raw
    monkeypatch.setattr(Checkpoint, "read", lambda self, name: loaded.append(name) or real_read(self, name))
    monkeypatch.setattr(Checkpoint, "_raw", lambda self, name: loaded.append(name) or real_raw(self, name))
    weights = ckpt.read_expert(0, 2)
    gate_up, down = weights.gate_up, weights.down
    assert not loaded
    assert gate_up.shape == (64, 64) and down.shape == (32, 64)


def _copy(tiny, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(tiny(name)[0], dst)
    return dst


def _one_line_error(path, match):
    with pytest.raises(MoestreamError, match=match) as info:
        moestream.load(path)
    assert "\n" not in str(info.value)


def test_missing_shard(tiny, tmp_path):
    path = _copy(tiny, "sharded", tmp_path)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    _one_line_error(path, f"shard {victim.name} .* is missing")


def test_truncated_file(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _one_line_error(path, "truncated")


def test_corrupt_header(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    _one_line_error(path, "corrupt safetensors header")


def test_shape_disagrees_with_config(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (path / "config.json").write_text(json.dumps(cfg))
    _one_line_error(path, "config.json does not match these weights")


def test_missing_tensor(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 6
    cfg.pop("layer_types"), cfg.pop("moe_layers"), cfg.pop("no_rope_layers")
    (path / "config.json").write_text(json.dumps(cfg))
    _one_line_error(path, "lacks tensor model.layers.4")


def test_not_llama4(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["MixtralForCausalLM"], "mixtral"
    (path / "config.json").write_text(json.dumps(cfg))
    _one_line_error(path, "MixtralForCausalLM model; moestream runs Llama 4")


def test_missing_or_broken_config(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    (path / "config.json").write_text("{not json")
    _one_line_error(path, "not valid JSON")
    (path / "config.json").unlink()
    _one_line_error(path, "needs config.json")


class _Bomb:
    """Unpickling this would create a marker file: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_checkpoint_is_refused_never_unpickled(tiny, tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    (path / "config.json").write_text((tiny("scout")[0] / "config.json").read_text())
    marker = tmp_path / "UNPICKLED"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps(_Bomb(marker)))
    _one_line_error(path, "pytorch_model.bin is a pickle checkpoint; moestream loads only safetensors")
    assert not marker.exists()


def test_over_long_prompt_and_bad_ids(tiny):
    llm = moestream.load(tiny("scout")[0], ctx_size=16)
    with pytest.raises(MoestreamError, match="exceed the context size of 16"):
        llm.logits(list(range(3, 20)))
    with pytest.raises(MoestreamError, match="token ids must lie"):
        llm.logits([VOCAB + 5])
    with pytest.raises(MoestreamError, match="context holds 16"):
        llm.generate_ids(list(range(3, 19)))


def test_context_beyond_model_maximum(tiny):
    with pytest.raises(MoestreamError, match="exceeds this model's maximum of 512"):
        moestream.load(tiny("scout")[0], ctx_size="1M")


def test_cli_error_is_one_line_without_traceback(tiny, tmp_path):
    path = _copy(tiny, "scout", tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 4)
    r = subprocess.run([sys.executable, "-m", "moestream", "generate", "-m", str(path), "-p", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


def test_interrupted_step_drops_the_cache(tiny):
    """A Ctrl+C inside a forward pass must not leave a half-written KV cache behind."""
    llm = moestream.load(tiny("scout")[0])
    from moestream.model.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=5)
    clean = llm.generate_ids([1, 5, 6, 7], params, stop_ids=set())
    calls = {"n": 0}
    real_routed = llm.model.routed  # the routed experts: eager in every step, CUDA graphs or not

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_routed(*args)

    llm.reset()
    llm.model.routed = flaky
    with pytest.raises(KeyboardInterrupt):
        llm.generate_ids([1, 5, 6, 7], params, stop_ids=set())
    llm.model.routed = real_routed
    assert llm.stats().kv.tokens == 0
    assert llm.generate_ids([1, 5, 6, 7], params, stop_ids=set()) == clean

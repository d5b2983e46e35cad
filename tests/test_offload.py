"""Expert offload changes where experts live and run, never the numbers.

On the CPU every path runs the same kernels as the resident model, so the logits must be
bit-identical: cache sizes from one slot to all experts, every policy, both splits, prefetch on and
off, the disk tier forced on (repacked file or straight from the checkpoint), CPU compute of misses.
"""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import moestream
from moestream import MoestreamError
from moestream.analysis.oracles import belady, lookahead_oracle, simulate
from moestream.model.sampling import SamplingParams
from moestream.profiling.routing import load_trace

from .conftest import VOCAB

PROMPT = torch.randint(3, VOCAB, (29,), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def reference(tiny):
    """name -> (path, resident logits, resident decode logits, expert bytes, number of experts)."""
    out = {}

    def get(name):
        if name not in out:
            path, _ = tiny(name)
            llm = moestream.load(path)
            n = len(llm.config.moe_layers) * llm.config.num_local_experts
            out[name] = (path, llm.logits(PROMPT), llm.decode_logits(PROMPT), llm.plan.expert_bytes, n)
        return out[name]

    return get


def check_exact(reference, name, tmp_path, **offload):
    path, logits, stepped, eb, n = reference(name)
    slots = offload.pop("slots", None)
    if slots is not None:
        offload["expert_cache"] = slots * eb
    llm = moestream.load(path, expert_dir=tmp_path, **offload)
    try:
        assert not llm.plan.resident
        assert torch.equal(llm.logits(PROMPT), logits)
        assert torch.equal(llm.decode_logits(PROMPT), stepped)
        return llm.stats()
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["scout", "maverick"])
@pytest.mark.parametrize("slots", [1, 3, 7])
@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_cache_sizes_policies_prefetch_are_exact(reference, tmp_path, name, slots, policy, prefetch):
    stats = check_exact(reference, name, tmp_path, slots=slots, cache_policy=policy, prefetch=prefetch,
                        cpu_experts="never", cpu_mem=0)  # cpu_mem=0: every expert on the disk tier
    assert stats.experts.slots == slots and stats.experts.cpu_runs == 0
    assert stats.experts.misses > 0 and stats.experts.bytes_disk_to_host > 0
    if prefetch:
        assert set(stats.experts.prefetch_recall) == {1, 2}
        assert all(0 <= v <= 1 for v in stats.experts.prefetch_recall.values())


@pytest.mark.parametrize("offload", [
    dict(slots=4, cache_split="per-layer", cpu_experts="never"),
    dict(slots=2, cpu_experts="always"),
    dict(slots=2, cpu_experts="auto"),
    dict(slots=3, cpu_experts="never", cpu_mem=0, repack=False),  # disk tier read straight from the checkpoint
    dict(cpu_moe=True),
    dict(n_cpu_moe=2, slots=8, cpu_experts="never"),
    dict(slots=5, cpu_mem="600KB", prefetch=3, cache_policy="predictive", cpu_experts="never"),
])
def test_placements_are_exact(reference, tmp_path, offload):
    check_exact(reference, "scout", tmp_path, **offload)


def test_every_slot_count_up_to_all_experts(reference, tmp_path):
    *_, n = reference("maverick")
    for slots in range(1, n):
        check_exact(reference, "maverick", tmp_path, slots=slots, cpu_experts="never", prefetch=1)
    llm = moestream.load(reference("maverick")[0], expert_cache=n * reference("maverick")[3])
    assert llm.plan.resident  # a budget >= all experts: fully resident, no store, no copies


def test_embedded_model_offloaded_is_exact(embedded, tmp_path):
    ids = embedded.tokenizer.encode_chat([{"role": "user", "content": "What news from the court, my lord?"}])
    ref, ref_steps = embedded.logits(ids), embedded.decode_logits(ids)
    eb = embedded.plan.expert_bytes
    for kw in (dict(expert_cache=32 * eb, cache_policy="predictive", prefetch=2, cpu_experts="never"),
               dict(expert_cache=8 * eb, cpu_mem=40 * eb, cpu_experts="auto", cache_split="per-layer"),
               # bf16 checkpoint, fp32 store, no repacked file: disk reads convert with torch ops
               dict(expert_cache=16 * eb, cpu_mem=0, repack=False, prefetch=1, cpu_experts="never", expert_dtype="f32")):
        llm = moestream.load(expert_dir=tmp_path, **kw)
        try:
            assert llm.experts.store.reads_with_torch == (kw.get("repack") is False)
            assert torch.equal(llm.logits(ids), ref)
            assert torch.equal(llm.decode_logits(ids), ref_steps)
        finally:
            llm.close()


def test_cpu_only_layers_never_touch_the_cache(reference, tmp_path):
    path, *_ = reference("scout")
    llm = moestream.load(path, cpu_moe=True, expert_dir=tmp_path)
    llm.logits(PROMPT)
    s = llm.stats()
    assert s.experts.slots == 0 and s.experts.fetches == 0 and s.experts.cpu_runs > 0 and s.experts.bytes_host_to_device == 0
    llm.close()


# --- budgets -----------------------------------------------------------------------------------
def test_device_accounting_stays_within_gpu_mem(reference, tmp_path):
    path, *_ , eb, n = reference("scout")
    probe = moestream.load(path, cpu_moe=True)
    fixed = probe.plan.resident_bytes + probe.plan.kv_bytes + probe.plan.workspace_bytes
    probe.close()
    budget = fixed + 5 * eb + eb // 2
    llm = moestream.load(path, gpu_mem=budget, expert_dir=tmp_path, cpu_experts="never")
    assert llm.plan.cache_slots == 5 and llm.plan.device_bytes <= budget
    seen = []  # the accounting after every decoded token, not just at the end

    def check(token):
        seen.append(llm.stats().memory.device_bytes)

    llm.generate_ids(PROMPT.tolist(), SamplingParams(temperature=0, max_tokens=40), check, stop_ids=set())
    s = llm.stats()
    assert s.memory.gpu_mem == budget and 0 < s.memory.device_bytes <= budget
    assert len(seen) == 40 and max(seen) <= budget
    llm.close()


def test_budget_below_minimum_names_the_minimum_that_works(reference, tmp_path):
    path, *_ = reference("scout")
    with pytest.raises(MoestreamError) as info:
        moestream.load(path, gpu_mem="10KB", cpu_experts="never")
    msg = str(info.value)
    assert "\n" not in msg and "use --gpu-mem" in msg
    minimum = msg.split("use --gpu-mem ")[1].split(" or more")[0]  # e.g. "2.48 MiB", quoted back as is
    llm = moestream.load(path, gpu_mem=minimum, cpu_experts="never", expert_dir=tmp_path)
    assert llm.plan.cache_slots >= 1
    llm.close()


@pytest.mark.parametrize("kwargs,match", [
    (dict(gpu_mem="forty gigs"), "is not a size"),
    (dict(cpu_mem="-3GiB"), "is not a size"),
    (dict(cache_policy="fifo"), "is not one of"),
    (dict(cpu_experts="sometimes"), "is not one of"),
    (dict(prefetch=-1), "must not be negative"),
])
def test_bad_settings_are_one_line(reference, kwargs, match):
    with pytest.raises(MoestreamError, match=match) as info:
        moestream.load(reference("scout")[0], **kwargs)
    assert "\n" not in str(info.value)


# --- disk tier -----------------------------------------------------------------------------------
def test_repacked_file_is_reused_then_rebuilt_when_stale(reference, tmp_path):
    from moestream.offload.store import RepackedFile

    path, logits, *_ = reference("scout")
    kw = dict(expert_cache=1, cpu_mem=0, expert_dir=tmp_path, cpu_experts="always")
    llm = moestream.load(path, **kw)
    files = list(tmp_path.glob("*.experts"))
    assert len(files) == 1 and not list(tmp_path.glob("*.json"))  # the metadata is in the file: no sidecar
    llm.close()
    stamp = files[0].stat().st_mtime_ns
    # a new process-equivalent load reuses it
    llm = moestream.load(path, **kw)
    assert files[0].stat().st_mtime_ns == stamp
    llm.close()
    # a stale header (another fingerprint, same size): the file is not trusted, it is rebuilt
    with open(files[0], "rb") as f:
        fingerprint = RepackedFile.read_header(f.fileno())["fingerprint"].encode()
    data = files[0].read_bytes()
    assert data.count(fingerprint) == 1
    files[0].write_bytes(data.replace(fingerprint, b"stale".ljust(len(fingerprint), b"-")))
    llm = moestream.load(path, **kw)
    assert torch.equal(llm.logits(PROMPT), logits)
    with open(files[0], "rb") as f:
        assert RepackedFile.read_header(f.fileno())["fingerprint"].encode() == fingerprint
    assert files[0].read_bytes() == data and list(tmp_path.glob("*.experts")) == files
    llm.close()


def test_unwritable_expert_dir_is_one_line(reference, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(MoestreamError, match="cannot write the expert file") as info:
        moestream.load(reference("scout")[0], expert_cache=1, cpu_mem=0, expert_dir=blocked / "sub")
    assert "\n" not in str(info.value) and "--expert-dir" in str(info.value)
    assert "a part of the path is a file" in str(info.value) and "free space" not in str(info.value)
    assert blocked.read_text() == "x"


RSS_PROBE = r"""
import resource, sys, torch, moestream
from moestream.model.checkpoint import Checkpoint
from moestream.offload.store import ExpertStore
from moestream.model.formats import FORMATS
ck = Checkpoint(sys.argv[1])
c = ck.config
keys = [(l, e) for l in c.moe_layers for e in range(c.num_local_experts)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
store = ExpertStore(ck, keys, len(keys), FORMATS["f32"], pin=False, expert_dir=None)
store.host.max()  # touch every page (max: no widened copy of the bytes)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, store.host_bytes)
"""


def test_loading_the_host_tier_holds_one_copy(tmp_path):
    """Peak RSS while filling the host tier stays near one copy of the experts (not two)."""
    from safetensors.torch import save_file

    D, F, E, L = 256, 1024, 16, 4  # 4 x 16 experts x 3 MiB = 192 MiB of experts
    cfg = dict(architectures=["Llama4ForCausalLM"], model_type="llama4_text", vocab_size=64, hidden_size=D,
               intermediate_size=F, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
               num_local_experts=E, attention_chunk_size=64, max_position_embeddings=256, dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from moestream.model.checkpoint import Checkpoint

    tensors = {name: torch.zeros(shape) for name, shape in Checkpoint.expected_shapes_for(
        moestream.model.config.ModelConfig.from_dict(cfg)).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    del tensors
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path)], capture_output=True, text=True, check=True)
    grew, host = map(int, out.stdout.split())
    assert host == L * E * 3 * D * F * 4
    assert grew < 1.2 * host, f"peak RSS grew {grew / 2**20:.0f} MiB for {host / 2**20:.0f} MiB of experts"


# --- Belady's MIN and the policies ------------------------------------------------------------------
def test_belady_on_hand_checked_traces():
    a, b, c, d = (0, 0), (0, 1), (0, 2), (0, 3)
    # 2 slots: A B C A B D A -> hits: A(4th) yes (evict B? no: at C, next uses A@3 B@4 -> evict B)...
    trace = [a, b, c, a, b, d, a]
    # hand: miss A, miss B, miss C (evict B: used at 4, A at 3) -> {A,C}; A hit; B miss (evict C: never) -> {A,B};
    # D miss (evict B: never again; A at 6) -> {A,D}; A hit. Hits = 2.
    assert belady(trace, 2) == [False, False, False, True, False, False, True]
    # LRU on the same trace hits nothing
    assert sum(simulate(trace, 2, "lru", [0])) == 0
    assert sum(belady([a, b, a, b], 1)) == 0 and sum(belady([a, a, a], 1)) == 2
    assert sum(belady(trace, 0)) == 0


def test_belady_is_optimal_against_exhaustive_search():
    def best(trace, slots, cache=frozenset(), i=0):
        if i == len(trace):
            return 0
        key = trace[i]
        if key in cache:
            return 1 + best(trace, slots, cache, i + 1)
        if len(cache) < slots:
            return best(trace, slots, cache | {key}, i + 1)
        return max(best(trace, slots, (cache - {v}) | {key}, i + 1) for v in cache)

    rng = random.Random(0)
    for _ in range(30):
        trace = [(0, rng.randrange(5)) for _ in range(rng.randrange(4, 11))]
        for slots in (1, 2, 3):
            assert sum(belady(trace, slots)) == best(trace, slots), (trace, slots)


def test_every_policy_is_at_most_min_on_a_recorded_trace(tmp_path):
    trace_path = tmp_path / "routing.jsonl"
    llm = moestream.load(record_routing=trace_path, expert_cache=20 * 294912, cpu_experts="never",
                         expert_dir=tmp_path, prefetch=1)
    llm.generate([{"role": "user", "content": "Speak, speak."}], max_tokens=60, seed=0, ignore_eos=True)
    llm.close()
    trace = load_trace(trace_path)
    assert trace.tokens == llm.stats().turn.prompt_tokens + 59
    assert any("predicted" in r for r in trace.records)
    accesses = trace.accesses()
    layers = trace.meta["moe_layers"]
    for slots in (8, 32, 64):
        for groups in (None, {layer: layer for layer in layers}):
            n = slots // len(layers) if groups else slots
            bound = sum(belady(accesses, n, groups))
            for policy in ("lru", "lfu", "predictive"):
                assert sum(simulate(accesses, n, policy, layers, groups)) <= bound
            oracles = [sum(lookahead_oracle(accesses, n, groups, h * len(layers))) for h in (1, 4, 10**6)]
            assert oracles[0] <= bound and oracles[1] <= bound and oracles[2] == bound  # all-seeing: MIN itself
    out = subprocess.run([sys.executable, "-m", "moestream", "bench", "replay", str(trace_path), "--slots", "32"],
                         capture_output=True, text=True, check=True).stdout
    assert "| Belady MIN | global | yes |" in out and "projected tok/s" in out
    assert "| oracle: next 1 token | per-layer |" in out and "| oracle: next 4 tokens | global |" in out


def test_record_routing_covers_every_token_and_layer(reference, tmp_path):
    path, *_ = reference("maverick")
    trace_path = tmp_path / "t.jsonl"
    llm = moestream.load(path, record_routing=trace_path)
    llm.decode_logits(PROMPT[:5])
    llm.close()
    lines = trace_path.read_text().splitlines()
    meta = json.loads(lines[0])
    assert meta["format"] == "moestream-routing/1" and meta["moe_layers"] == [1, 3, 5, 7]
    recs = [json.loads(x) for x in lines[1:]]
    assert len(recs) == 5 * 4 and [r["step"] for r in recs[::4]] == list(range(5))
    assert all(len(r["experts"]) == 1 and 0 <= r["experts"][0][0] < 4 and 0 < r["scores"][0][0] < 1 for r in recs)
    assert not any(p.suffix in (".pkl", ".pt") for p in tmp_path.iterdir())
    assert os.path.getsize(trace_path) > 0


def test_recorded_predictions_are_the_prefetchers_guesses(embedded, tmp_path):
    """The trace's "predicted" fields, scored against the recorded routing, give the recall the
    prefetcher reports itself; prefill steps (no prediction) and each step's first layer carry none."""
    trace_path = tmp_path / "t.jsonl"
    llm = moestream.load(expert_cache=32 * embedded.plan.expert_bytes, prefetch=1, cpu_experts="never",
                         record_routing=trace_path, expert_dir=tmp_path)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Good morrow, my lord."}])
    llm.generate_ids(ids, SamplingParams(temperature=0.8, seed=0, max_tokens=40), stop_ids=set())
    recall = llm.stats().experts.prefetch_recall[1]
    llm.close()
    recs = [json.loads(x) for x in trace_path.read_text().splitlines()[1:]]
    assert len(recs) == 40 * 8 and len({r["step"] for r in recs}) == 40
    first = [r for r in recs if r["layer"] == 0 or r["step"] == 0]
    assert not any("predicted" in r for r in first)
    scored = [r for r in recs if r not in first]
    assert all("predicted" in r for r in scored)
    hits = sum(r["experts"][0][0] in r["predicted"] for r in scored)
    assert hits / len(scored) == pytest.approx(recall)


def test_policies_have_distinct_victims():
    from moestream.offload.policies import LFU, LRU, Predictive

    keys = [(0, 0), (0, 1), (0, 2)]
    lru, lfu, pred = LRU([0, 1]), LFU([0, 1]), Predictive([0, 1])
    for k in [keys[0], keys[0], keys[0], keys[1], keys[2]]:
        for p in (lru, lfu, pred):
            p.observe(k[0], [k[1]])
            p.touch(k)
    assert lru.victim(keys) == keys[0]  # least recent
    assert lfu.victim(keys) in (keys[1], keys[2])  # least frequent
    pred.predicted({keys[1]: 1})
    assert pred.victim(keys) == keys[2]  # rarest and not predicted: farthest expected next use


def test_prefill_needing_more_experts_than_a_layer_has_slots(embedded, tmp_path):
    """Per-layer shares of 2 slots, prefill steps needing up to 16 experts per layer, a chat turn
    that reuses the cache: deferred fetches wait for slots, and the tokens equal the resident run's."""
    params = SamplingParams(temperature=0.8, seed=0, max_tokens=30)
    first = embedded.tokenizer.encode_chat([{"role": "user", "content": "Good morrow, my lord."}])
    embedded.reset()
    ref1 = embedded.generate_ids(first, params)
    follow = first + ref1 + embedded.tokenizer.encode("And the king?", bos=False)
    ref2 = embedded.generate_ids(follow, params)
    llm = moestream.load(expert_cache=16 * embedded.plan.expert_bytes, cache_split="per-layer", cpu_experts="never",
                         expert_dir=tmp_path)
    assert llm.experts.cache.split == "per-layer"
    assert llm.generate_ids(first, params) == ref1
    assert llm.generate_ids(follow, params) == ref2
    assert llm.stats().experts.cpu_runs == 0
    llm.close()

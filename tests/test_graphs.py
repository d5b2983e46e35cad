"""The one-token step as replayed parts (model/graphs.py), through its CPU twin: the parts run
uncaptured on their static inputs, so these tests check on the CPU what a CUDA capture replays:
the split step computes the eager step's numbers, bit for bit, everywhere a decode step goes."""

import pytest
import torch

import moestream
from moestream.model import graphs
from moestream.model.sampling import SamplingParams

from .conftest import VOCAB

PROMPT = torch.randint(3, VOCAB, (70,), generator=torch.Generator().manual_seed(21))  # past a 64-token chunk


def twin(llm):
    """llm with its step split into parts (the CPU twin), counting part calls."""
    assert llm.model.capture_graphs(capture=False) is None and llm.model.graphs.built
    calls = []
    for key, part in llm.model.graphs.parts.items():
        fn = part.fn
        part.fn = lambda *a, fn=fn, key=key: calls.append(key) or fn(*a)
    return calls


@pytest.mark.parametrize("name", ["scout", "maverick"])
def test_split_step_decodes_the_eager_steps_bits(tiny, tmp_path, name):
    """MoE and dense layers, RoPE and NoPE, chunked and global attention; resident and offloaded
    experts (one slot, disk tier)."""
    path = tiny(name)[0]
    eager = moestream.load(path, device="cpu", cuda_graphs=False)
    expected, whole = eager.decode_logits(PROMPT), eager.logits(PROMPT)
    eb = eager.plan.expert_bytes
    eager.close()
    for kw in ({}, dict(expert_cache=eb, cpu_mem=0, expert_dir=tmp_path, cpu_experts="never")):
        llm = moestream.load(path, device="cpu", **kw)
        try:
            calls = twin(llm)
            assert torch.equal(llm.decode_logits(PROMPT), expected), kw
            layers = llm.config.num_hidden_layers
            parts_per_step = layers + sum(2 if llm.config.is_moe(i) else 1 for i in range(layers)) + 1
            assert len(calls) == len(PROMPT) * parts_per_step  # every one-token step went through the parts
            calls.clear()
            assert torch.equal(llm.logits(PROMPT), whole) and not calls  # a prompt runs eagerly
        finally:
            llm.close()


def test_the_routing_trace_keeps_each_steps_own_answers(tiny, tmp_path):
    """The trace keeps the router's tensors until it flushes; the parts' outputs are overwritten by
    the next step, so the split step hands it copies: its trace is the eager step's, line for line."""
    path, traces = tiny("maverick")[0], []
    for split in (False, True):
        trace = tmp_path / f"{split}.jsonl"
        llm = moestream.load(path, device="cpu", record_routing=trace)
        if split:
            twin(llm)
        llm.decode_logits(PROMPT)
        llm.close()
        traces.append(trace.read_text().splitlines()[1:])
    assert len(traces[0]) == len(PROMPT) * len(llm.config.moe_layers) and traces[1] == traces[0]


def test_graphed_tokens_equal_eager_tokens_in_a_chat_reply(tiny):
    llm = moestream.load(tiny("scout")[0], device="cpu")
    params = SamplingParams(temperature=0, max_tokens=12)
    prompt = PROMPT[:20].tolist()
    expected = llm.generate_ids(prompt, params, stop_ids=set())
    twin(llm)
    llm.reset()
    assert llm.generate_ids(prompt, params, stop_ids=set()) == expected
    llm.close()


def test_a_capture_that_fails_leaves_the_eager_step_and_says_so(tiny, monkeypatch):
    """Where capturing fails (here: a torch without CUDA, or a part that raises) nothing is kept, the
    note names the cause and the flag, and decoding works as before."""
    llm = moestream.load(tiny("scout")[0], device="cpu")
    expected = llm.decode_logits(PROMPT[:10])
    if not torch.cuda.is_available():
        note = llm.model.capture_graphs(capture=True)
        assert note.startswith("CUDA graphs off") and "--enforce-eager" in note and llm.model.graphs is None
    calls = []

    def fails_on_the_third(self, fn, args, capture, pool=None):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        self.fn, self.inputs, self.graph, self.outputs = fn, args, None, None

    monkeypatch.setattr(graphs.Part, "__init__", fails_on_the_third)
    note = llm.model.capture_graphs(capture=False)
    assert note == ("CUDA graphs off, decoding op by op (RuntimeError: operation not permitted when stream is "
                    "capturing); --enforce-eager skips trying")
    assert llm.model.graphs is None
    assert torch.equal(llm.decode_logits(PROMPT[:10]), expected)
    llm.close()


def test_enforce_eager_is_a_setting_and_a_cpu_run_captures_nothing(tiny):
    from moestream.config import RuntimeConfig

    assert RuntimeConfig.build().cuda_graphs is True
    assert RuntimeConfig.build(cuda_graphs=False).cuda_graphs is False
    llm = moestream.load(tiny("scout")[0], device="cpu")
    assert llm.model.graphs is None and llm.graph_note is None  # on the CPU the step stays eager
    llm.close()


def test_a_closed_model_with_its_parts_is_freed_at_once(tiny):
    """The parts hold weights, not the model: no reference cycle, so a closed model (and on a GPU its
    graphs' memory pool) goes when the last reference does, though load() freezes the collector."""
    import weakref

    llm = moestream.load(tiny("scout")[0], device="cpu")
    twin(llm)
    llm.decode_logits(PROMPT[:3])
    model = weakref.ref(llm.model)
    llm.close()
    del llm
    assert model() is None

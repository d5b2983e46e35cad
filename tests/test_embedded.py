"""The embedded default model: loads with no download, matches transformers, uses every expert."""

import json
import pytest
import torch

from moestream.config import DEFAULT_MODEL
from moestream.data.shakespeare import held_out_ids as held_out

from .conftest import oracle_logits

def test_ships_inside_the_package_in_hf_layout():
    names = {p.name for p in DEFAULT_MODEL.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir())
    assert size <= 30 * 2**20
    cfg = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert cfg["num_local_experts"] == 16 and cfg["num_experts_per_tok"] == 1
    assert cfg["num_hidden_layers"] >= 6


def test_architecture_exercises_both_attention_kinds(embedded):
    c = embedded.config
    assert c.global_layers and any(c.rope_layers)
    assert c.attention_chunk_size <= 128
    assert len(c.moe_layers) == c.num_hidden_layers


def test_matches_transformers(embedded):
    from transformers import Llama4ForCausalLM

    oracle = Llama4ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor(held_out(embedded.tokenizer, 300))  # several chunks of 64
    ref = oracle_logits(oracle, ids)
    assert (embedded.logits(ids) - ref).abs().max().item() < 1e-4
    assert (embedded.decode_logits(ids[:150]) - ref[:150]).abs().max().item() < 1e-4


def test_every_expert_receives_tokens_on_held_out_text(embedded):
    counts = torch.zeros(embedded.config.num_hidden_layers, embedded.config.num_local_experts)

    def record(routing):
        layer, experts, _ = routing
        counts[layer] += torch.bincount(experts.flatten().cpu(), minlength=counts.shape[1]).float()

    embedded.model.on_route = record
    try:
        ids = held_out(embedded.tokenizer, 8192)
        for i in range(0, len(ids), 256):
            embedded.logits(ids[i:i + 256])
    finally:
        embedded.model.on_route = None
    share = counts / counts.sum(1, keepdim=True)
    print(f"min expert share {share.min():.4f}, max {share.max():.4f}")
    assert share.min() > 0, f"unused experts: {(counts == 0).nonzero().tolist()}"


def test_chat_template_has_no_double_bos(embedded):
    tok = embedded.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "Good morrow"}])
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    text = tok.render([{"role": "user", "content": "Good morrow"}])
    assert text.startswith("<|begin_of_text|><|header_start|>user<|header_end|>\n\nGood morrow<|eot|>")
    assert text.endswith("<|header_start|>assistant<|header_end|>\n\n")
    assert tok.encode("<|begin_of_text|>hi").count(tok.bos_id) == 1


def test_stop_tokens_and_streaming(embedded):
    tok = embedded.tokenizer
    assert tok.tok.token_to_id("<|eot|>") in embedded.stop_ids
    pieces = []
    text = embedded.generate([{"role": "user", "content": "Speak, speak."}], max_tokens=40, seed=3, stream=pieces.append)
    assert text == "".join(pieces)
    assert "<|" not in text
    # the reply ended on a stop token or at max_tokens
    assert embedded.stats().turn.generated_tokens <= 40


@pytest.mark.parametrize("word", ["café — naïve", "ROMEO:\nO, she doth teach the torches"])
def test_stream_decoding_round_trips(embedded, word):
    tok = embedded.tokenizer
    step = tok.stream_decoder()
    assert "".join(step(i) for i in tok.encode(word, bos=False)) == word


def test_fallback_template_when_config_has_none(tmp_path):
    import shutil

    from moestream.model.tokenizer import Tokenizer

    for name in ("tokenizer.json", "generation_config.json"):
        shutil.copy(DEFAULT_MODEL / name, tmp_path / name)
    tok = Tokenizer(tmp_path)
    assert tok.render([{"role": "user", "content": "x"}]).startswith("<|begin_of_text|><|header_start|>user")
    assert tok.stop_ids

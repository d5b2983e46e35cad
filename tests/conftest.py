"""Tiny random Llama 4 checkpoints written by transformers' own classes, and the oracle logits.

Every checkpoint is made once per test session. `transformers` is the numerical oracle: the
reference logits come from its Llama4ForCausalLM / Llama4ForConditionalGeneration in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 320
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=32, intermediate_size_mlp=80, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
    attention_chunk_size=8,  # prompts of 30+ tokens cross several chunks
    floor_scale=4,  # so attention temperature tuning is active from position 3 on
    max_position_embeddings=512, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)

# name -> (text config overrides, how it is saved)
VARIANTS = {
    # every layer MoE, QK-norm, llama3 RoPE scaling
    "scout": (dict(use_qk_norm=True, interleave_moe_layer_step=1, rope_parameters=LLAMA3_ROPE), "causal"),
    # dense and MoE layers interleaved, no QK-norm, plain RoPE, 8 layers (two NoPE)
    "maverick": (dict(use_qk_norm=False, interleave_moe_layer_step=2, num_hidden_layers=8,
                      rope_parameters=dict(rope_type="default", rope_theta=500000.0)), "causal"),
    # scout-like, sharded into many files with model.safetensors.index.json
    "sharded": (dict(use_qk_norm=True, rope_parameters=LLAMA3_ROPE), "sharded"),
    # saved as Llama4ForConditionalGeneration: text under text_config, weights under language_model.
    "multimodal": (dict(use_qk_norm=True, interleave_moe_layer_step=2, rope_parameters=LLAMA3_ROPE), "multimodal"),
    # the transformers-4.51 config dialect: rope_theta + rope_scaling, no layer_types / moe_layers
    "dialect451": (dict(use_qk_norm=True, rope_parameters=LLAMA3_ROPE), "dialect451"),
}
# intermediate_size = hidden_size / pixel_shuffle_ratio^2: the adapter reads the shuffled channels (a tower
# transformers itself can run on an image, so the multimodal checkpoint loads with its vision tower)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128, vision_output_dim=32,
              projector_input_dim=32, projector_output_dim=32, image_size=28, patch_size=14)


def make_checkpoint(path: Path, overrides: dict, how: str, seed: int = 0):
    """Write a random tiny checkpoint with transformers; return the float32 oracle model."""
    from transformers import Llama4Config, Llama4ForCausalLM, Llama4ForConditionalGeneration, Llama4TextConfig

    torch.manual_seed(seed)
    text = dict(TEXT, **overrides)
    if how == "multimodal":
        model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=VISION)).eval()
        model.save_pretrained(path)
        return model
    model = Llama4ForCausalLM(Llama4TextConfig(**text)).eval()
    model.save_pretrained(path, max_shard_size="40KB" if how == "sharded" else "10GB")
    if how == "dialect451":
        cfg = json.loads((path / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        for key in ("layer_types", "moe_layers", "no_rope_layers"):
            cfg.pop(key, None)
        cfg["torch_dtype"] = cfg.pop("dtype", "float32")
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(name) -> (checkpoint dir, transformers oracle model); built once per session."""
    made: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            overrides, how = VARIANTS[name]
            made[name] = (path, make_checkpoint(path, overrides, how))
        return made[name]

    return get


def text_oracle(model):
    """The text model inside a saved Llama4ForConditionalGeneration (its Llama4ForCausalLM), else the model.

    Text-only references go through it: the multimodal wrapper's own forward is not what we compare
    against for text, and it has broken across transformers releases (5.24.0 reads an attribute its
    text model no longer returns)."""
    return getattr(model, "language_model", model)


def oracle_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return text_oracle(model)(input_ids=ids[None]).logits[0].float()


@pytest.fixture(scope="session")
def embedded():
    import moestream

    return moestream.load()

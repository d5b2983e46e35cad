"""Model presets with the real Llama 4 shapes (config.json dialect): `moestream plan --preset` and
`bench --synthetic` use them, no checkpoint needed. `tiny` is a small shape for smoke tests."""

from __future__ import annotations

_LLAMA4 = dict(architectures=["Llama4ForCausalLM"], model_type="llama4_text", vocab_size=202048, hidden_size=5120,
               intermediate_size=8192, intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
               num_key_value_heads=8, head_dim=128, num_experts_per_tok=1, attention_chunk_size=8192,
               rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=200000, eos_token_id=[200001, 200007, 200008],
               torch_dtype="bfloat16")
PRESETS = {
    "scout": dict(_LLAMA4, num_local_experts=16, interleave_moe_layer_step=1, use_qk_norm=True,
                  max_position_embeddings=10485760,
                  rope_scaling=dict(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                    original_max_position_embeddings=8192)),
    "maverick": dict(_LLAMA4, num_local_experts=128, interleave_moe_layer_step=2, use_qk_norm=False,
                     max_position_embeddings=1048576),
}
HF_IDS = {"scout": "meta-llama/Llama-4-Scout-17B-16E-Instruct", "maverick": "meta-llama/Llama-4-Maverick-17B-128E-Instruct"}
SYNTHETIC = dict(PRESETS, tiny=dict(PRESETS["scout"], vocab_size=512, hidden_size=64, intermediate_size=96,
                                    intermediate_size_mlp=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, attention_chunk_size=32,
                                    max_position_embeddings=4096, rope_scaling=None))

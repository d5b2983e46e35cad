"""ModelConfig: the Llama 4 text architecture, read from either config.json dialect.

Released checkpoints (transformers 4.51) carry `rope_theta` + `rope_scaling` and may omit
`layer_types` / `moe_layers` / `no_rope_layers`; transformers >= 5 writes `rope_parameters` and the
lists. Both are normalised here once, so the model code never looks at raw JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoestreamError

LLAMA4_ARCHITECTURES = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM", "Llama4TextModel")
LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")


@dataclass
class RopeScaling:
    """llama3-style frequency scaling (None on the model means plain RoPE)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed and shared expert width F
    intermediate_size_mlp: int  # dense-layer MLP width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    moe_layers: list[int]
    rope_layers: list[bool]  # True = RoPE + chunked local attention, False = NoPE + global attention
    use_qk_norm: bool
    attention_chunk_size: int
    attn_temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "bfloat16"
    is_multimodal: bool = False  # saved as Llama4ForConditionalGeneration (text under text_config)

    # --- derived facts the rest of the runtime asks about ---
    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    def uses_rope(self, layer: int) -> bool:
        return self.rope_layers[layer]

    @property
    def global_layers(self) -> list[int]:
        return [i for i, r in enumerate(self.rope_layers) if not r]

    @property
    def expert_numel(self) -> int:
        """Elements of one routed expert: gate+up [D, 2F] and down [F, D]."""
        return 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoestreamError(f"{path} not found: a model directory needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoestreamError(f"{path} is not valid JSON ({e}); re-download config.json") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if not any(a in LLAMA4_ARCHITECTURES for a in archs) and model_type not in LLAMA4_MODEL_TYPES:
            what = ", ".join(archs) or model_type or "unknown"
            raise MoestreamError(
                f"{source} describes a {what} model; moestream runs Llama 4 checkpoints "
                f"(architectures {' or '.join(LLAMA4_ARCHITECTURES[:2])})"
            )
        multimodal = "text_config" in raw
        top = raw
        t = dict(raw.get("text_config") or raw)
        try:
            return cls._from_text_config(t, top, multimodal)
        except KeyError as e:
            raise MoestreamError(f"{source} lacks the field {e.args[0]!r} that a Llama 4 config needs") from None

    @classmethod
    def _from_text_config(cls, t: dict, top: dict, multimodal: bool) -> "ModelConfig":
        n = int(t["num_hidden_layers"])
        heads = int(t["num_attention_heads"])
        hidden = int(t["hidden_size"])

        # NoPE/RoPE schedule: explicit list (1 = RoPE) or every `no_rope_layer_interval`-th is NoPE.
        nrl = t.get("no_rope_layers")
        if nrl:
            rope_layers = [bool(v) for v in nrl[:n]]
        else:
            interval = int(t.get("no_rope_layer_interval", 4))
            rope_layers = [(i + 1) % interval != 0 for i in range(n)]

        moe_layers = t.get("moe_layers")
        if moe_layers is None:
            step = int(t.get("interleave_moe_layer_step", 1))
            moe_layers = list(range(step - 1, n, step))

        # RoPE parameters: v5 `rope_parameters`, or 4.51 `rope_theta` + `rope_scaling`.
        rp = dict(t.get("rope_parameters") or {})
        rs = t.get("rope_scaling") or {}
        theta = float(rp.get("rope_theta", t.get("rope_theta", 500000.0)))
        scaling_src = rp if rp.get("rope_type", rp.get("type")) == "llama3" else rs
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default")) if scaling_src else "default"
        max_pos = int(t.get("max_position_embeddings", 131072))
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src["low_freq_factor"]),
                high_freq_factor=float(scaling_src["high_freq_factor"]),
                original_max_position_embeddings=int(
                    scaling_src.get("original_max_position_embeddings", max_pos)
                ),
            )
        elif rope_type not in ("default", None):
            raise MoestreamError(f"rope type {rope_type!r} is not supported (Llama 4 uses default or llama3)")

        eos = t.get("eos_token_id", top.get("eos_token_id"))
        eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        bos = t.get("bos_token_id", top.get("bos_token_id"))
        dtype = t.get("torch_dtype") or t.get("dtype") or top.get("torch_dtype") or top.get("dtype") or "bfloat16"
        chunk = t.get("attention_chunk_size")

        return cls(
            vocab_size=int(t["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(t["intermediate_size"]),
            intermediate_size_mlp=int(t.get("intermediate_size_mlp", 16384)),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=int(t.get("num_key_value_heads") or heads),
            head_dim=int(t.get("head_dim") or hidden // heads),
            num_local_experts=int(t.get("num_local_experts", 16)),
            num_experts_per_tok=int(t.get("num_experts_per_tok", 1)),
            moe_layers=[int(i) for i in moe_layers],
            rope_layers=rope_layers,
            use_qk_norm=bool(t.get("use_qk_norm", True)),
            attention_chunk_size=int(chunk) if chunk else max_pos,
            attn_temperature_tuning=bool(t.get("attn_temperature_tuning", True)),
            floor_scale=float(t.get("floor_scale", 8192)),
            attn_scale=float(t.get("attn_scale", 0.1)),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(t.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
            bos_token_id=int(bos) if bos is not None else None,
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype),
            is_multimodal=multimodal,
        )

"""ModelConfig: the Llama 4 text architecture, read from either config.json dialect.

Released checkpoints (transformers 4.51) carry `rope_theta` + `rope_scaling` and may omit
`layer_types` / `moe_layers` / `no_rope_layers`; transformers >= 5 writes `rope_parameters` and the
lists. Both are normalised here once, so the model code never looks at raw JSON.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoestreamError

LLAMA4_ARCHITECTURES = ("Llama4ForConditionalGeneration", "Llama4ForCausalLM", "Llama4TextModel")
SUPPORTED_QUANT_METHODS = ("fbgemm_fp8",)  # Meta's official FP8 Llama 4 checkpoints
LLAMA4_MODEL_TYPES = ("llama4", "llama4_text")
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as on huggingface.co
GGUF_MAGIC = b"GGUF"


def misused_model_path(path: Path) -> str | None:
    """Why `-m PATH` is not a checkpoint directory, when it is a newcomer's usual mistake (a file, a
    GGUF, a Hugging Face repo id that was never downloaded); None otherwise."""
    if path.is_file():
        try:
            with open(path, "rb") as f:
                gguf = f.read(4) == GGUF_MAGIC
        except OSError:
            gguf = False
        if gguf or path.suffix.lower() == ".gguf":
            return (f"{path} is a GGUF file, which moestream does not read: -m takes a Hugging Face checkpoint "
                    "directory (config.json + *.safetensors); get one with hf download "
                    "meta-llama/Llama-4-Scout-17B-16E-Instruct --local-dir DIR, then -m DIR")
        return (f"{path} is a file: -m takes a checkpoint directory (the one holding config.json and *.safetensors), "
                f"e.g. -m {path.parent}")
    if not path.exists() and HF_REPO_ID.match(str(path)):
        return (f"model directory {path} does not exist; to use the Hugging Face repo {path}, download it first: "
                f"hf download {path} --local-dir DIR, then -m DIR")
    return None


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Typed reads of one config.json object: a wrong type or range names the field and the file."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def bad(self, key: str, what: str) -> MoestreamError:
        return MoestreamError(f"{self.source}: {key} must be {what} (got {_shown(self.raw.get(key))}); "
                              "fix it or re-download config.json")

    def get(self, key: str, default):
        """The value, or the default when absent or null; KeyError when there is no default."""
        value = self.raw.get(key)
        if value is None:
            if default is KeyError:
                raise KeyError(key)
            return default
        return value

    def int(self, key: str, default=KeyError, minimum: int = 1) -> int:
        value = self.get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.bad(key, f"a whole number >= {minimum}")
        return value

    def float(self, key: str, default=KeyError, positive: bool = True) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise self.bad(key, "a positive number" if positive else "a finite number")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        """true / false; a number counts as its truth (transformers 4.51 wrote attn_temperature_tuning: 4)."""
        value = self.get(key, default)
        if not isinstance(value, (bool, int)):
            raise self.bad(key, "true or false")
        return bool(value)

    def dict(self, key: str) -> dict:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.bad(key, "a JSON object")
        return value


def read_config_json(path: str | Path):
    """config.json's parsed contents, or one line saying what to do (the text and vision configs both read it)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise MoestreamError(f"{path} not found: a model directory needs config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoestreamError(f"{path} is not valid JSON ({e}); re-download config.json") from None


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
    is_multimodal: bool = False
    quant_method: str | None = None  # quantization_config.quant_method: None, or "fbgemm_fp8" (fp8 linear weights)  # saved as Llama4ForConditionalGeneration (text under text_config)

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
        return cls.from_dict(read_config_json(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        """Every field checked for type and range here, so a hand-edited or truncated config.json is
        one line naming the field, not a ZeroDivisionError or an IndexError deep in the model."""
        if not isinstance(raw, dict):
            raise MoestreamError(f"{source} holds a JSON {type(raw).__name__}, not an object: re-download config.json")
        archs = raw.get("architectures") or []
        archs = [archs] if isinstance(archs, str) else archs
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise _Fields(raw, source).bad("architectures", "a list of class names")
        model_type = raw.get("model_type")
        if not any(a in LLAMA4_ARCHITECTURES for a in archs) and model_type not in LLAMA4_MODEL_TYPES:
            what = ", ".join(archs) or (model_type if isinstance(model_type, str) else None) or "unknown"
            raise MoestreamError(
                f"{source} describes a {what} model; moestream runs Llama 4 checkpoints "
                f"(architectures {' or '.join(LLAMA4_ARCHITECTURES[:2])})"
            )
        multimodal = "text_config" in raw
        top = raw
        t = _Fields(raw, source).dict("text_config") if multimodal else raw
        try:
            return cls._from_text_config(_Fields(dict(t or raw), source), top, multimodal)
        except KeyError as e:
            raise MoestreamError(f"{source} lacks the field {e.args[0]!r} that a Llama 4 config needs") from None

    @classmethod
    def _from_text_config(cls, t: _Fields, top: dict, multimodal: bool) -> "ModelConfig":
        n = t.int("num_hidden_layers")
        heads = t.int("num_attention_heads")
        hidden = t.int("hidden_size")
        kv_heads = t.int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise t.bad("num_key_value_heads", f"a divisor of num_attention_heads ({heads})")
        experts = t.int("num_local_experts", 16)
        top_k = t.int("num_experts_per_tok", 1)
        if top_k > experts:
            raise t.bad("num_experts_per_tok", f"at most num_local_experts ({experts})")

        # NoPE/RoPE schedule: explicit list (1 = RoPE) or every `no_rope_layer_interval`-th is NoPE.
        nrl = t.raw.get("no_rope_layers")
        if nrl:
            if not isinstance(nrl, list) or len(nrl) < n or not all(v in (0, 1) for v in nrl):
                raise t.bad("no_rope_layers", f"a list of {n} entries of 0 (NoPE) or 1 (RoPE), one per layer")
            rope_layers = [bool(v) for v in nrl[:n]]
        else:
            interval = t.int("no_rope_layer_interval", 4)
            rope_layers = [(i + 1) % interval != 0 for i in range(n)]

        moe_layers = t.raw.get("moe_layers")
        if moe_layers is None:
            step = t.int("interleave_moe_layer_step", 1)
            moe_layers = list(range(step - 1, n, step))
        if (not isinstance(moe_layers, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in moe_layers)
                or len(set(moe_layers)) != len(moe_layers)):
            raise t.bad("moe_layers", f"a list of distinct layer numbers in 0..{n - 1}")

        # RoPE parameters: v5 `rope_parameters`, or 4.51 `rope_theta` + `rope_scaling`.
        rp = _Fields(t.dict("rope_parameters"), f"{t.source} rope_parameters")
        rs = _Fields(t.dict("rope_scaling"), f"{t.source} rope_scaling")
        theta = rp.float("rope_theta", t.float("rope_theta", 500000.0))
        scaling_src = rp if rp.raw.get("rope_type", rp.raw.get("type")) == "llama3" else rs
        rope_type = scaling_src.raw.get("rope_type", scaling_src.raw.get("type", "default")) if scaling_src.raw else "default"
        max_pos = t.int("max_position_embeddings", 131072)
        scaling = None
        if rope_type == "llama3":
            scaling = RopeScaling(
                factor=scaling_src.float("factor"),
                low_freq_factor=scaling_src.float("low_freq_factor"),
                high_freq_factor=scaling_src.float("high_freq_factor"),
                original_max_position_embeddings=scaling_src.int("original_max_position_embeddings", max_pos),
            )
        elif rope_type not in ("default", None):
            raise MoestreamError(f"rope type {rope_type!r} is not supported (Llama 4 uses default or llama3)")

        eos = t.raw.get("eos_token_id", top.get("eos_token_id"))
        eos_ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in eos_ids):
            raise t.bad("eos_token_id", "a token id or a list of token ids")
        bos = t.raw.get("bos_token_id", top.get("bos_token_id"))
        if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
            raise t.bad("bos_token_id", "a token id")
        dtype = (t.raw.get("torch_dtype") or t.raw.get("dtype") or top.get("torch_dtype") or top.get("dtype")
                 or "bfloat16")
        tie = t.bool("tie_word_embeddings", _Fields(top, t.source).bool("tie_word_embeddings", False))
        quant = t.raw.get("quantization_config", top.get("quantization_config"))
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if quant is not None and method not in SUPPORTED_QUANT_METHODS:
            raise MoestreamError(
                f"{t.source}: quantization_config.quant_method {method!r} is not one moestream reads (it reads "
                f"{', '.join(SUPPORTED_QUANT_METHODS)}; or a bf16 checkpoint with --expert-dtype int8/int4/int2/fp8)")
        chunk = t.raw.get("attention_chunk_size")

        return cls(
            vocab_size=t.int("vocab_size"),
            hidden_size=hidden,
            intermediate_size=t.int("intermediate_size"),
            intermediate_size_mlp=t.int("intermediate_size_mlp", 16384),
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=t.int("head_dim", hidden // heads),
            num_local_experts=experts,
            num_experts_per_tok=top_k,
            moe_layers=sorted(moe_layers),
            rope_layers=rope_layers,
            use_qk_norm=t.bool("use_qk_norm", True),
            attention_chunk_size=max_pos if chunk in (None, 0) else t.int("attention_chunk_size"),  # 0: no chunking
            attn_temperature_tuning=t.bool("attn_temperature_tuning", True),
            floor_scale=t.float("floor_scale", 8192.0),
            attn_scale=t.float("attn_scale", 0.1),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=t.float("rms_norm_eps", 1e-5),
            max_position_embeddings=max_pos,
            tie_word_embeddings=tie,
            bos_token_id=bos,
            eos_token_ids=list(eos_ids),
            torch_dtype=str(dtype),
            is_multimodal=multimodal,
            quant_method=method,
        )

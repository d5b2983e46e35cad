"""Checkpoint: a Hugging Face Llama 4 directory, validated up front and read lazily.

Why validate first: a missing shard, a truncated file or a config that disagrees with the weights
should fail at load with one line naming the file, not minutes later inside a matmul. The headers of
every safetensors file are parsed (8-byte length + JSON) without touching tensor data, so checking
a 200 GB checkpoint costs milliseconds.

Why lazy: routed experts are ~90% of the bytes. `read_expert(layer, e)` slices one expert out of the
memory-mapped fused `[E, D, 2F]` / `[E, F, D]` tensors (or reads the per-expert variant) and never
materialises a whole layer's experts.

A Llama4ForConditionalGeneration checkpoint also holds the vision tower and projector
(`vision_model.*`, `multi_modal_projector.*`): indexed apart from the text tensors, in `vision_tensors`,
and read by `read_vision` (model/vision.py checks them against vision_config), unless vision is off.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import MoestreamError
from .config import ModelConfig, misused_model_path
from .formats import ExpertFormat, ExpertWeights

SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,  # fbgemm_fp8 checkpoints' linear weights, each with a float scale per output
}
FLOAT_DTYPES = ("F32", "F16", "BF16")
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass
class CheckpointStats:
    """What was read of the routed experts: proves laziness (a token reads only its experts)."""

    expert_reads: int = 0  # experts sliced out of the files
    expert_bytes_read: int = 0


@dataclass
class TensorInfo:
    shard: Path
    key: str  # the name inside the shard file (with its original prefix)
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the shard file


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header and check that the file holds every byte it promises.

    Returns (tensor entries, absolute offset where the data section starts). After this, a
    TensorInfo's offset and shape can be trusted: a positioned read there reads that tensor and no other."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise MoestreamError(f"{path.name} is truncated ({size} bytes): re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise MoestreamError(
                    f"{path.name} is truncated or not a safetensors file (header of {n} bytes, "
                    f"file of {size}): re-download it"
                )
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoestreamError(f"{path.name} has a corrupt safetensors header: re-download it") from None
    except OSError as e:
        raise MoestreamError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise MoestreamError(
            f"{path.name} has a corrupt safetensors header (a JSON {type(header).__name__}, not an object): re-download it"
        )
    header.pop("__metadata__", None)
    check_entries(path, header, size - 8 - n)
    return header, 8 + n


# Bits per element of every safetensors dtype: a tensor's byte span must be exactly shape x this.
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _integers(xs) -> bool:
    return isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in xs)


def check_entries(path: Path, header: dict, data_bytes: int) -> None:
    """Every entry a well-formed tensor whose bytes lie in the file, and the spans tiling the data
    section with no gap or overlap (what safetensors itself requires, so safe_open never fails later)."""

    def corrupt(key: str, what: str) -> MoestreamError:
        return MoestreamError(f"{path.name} is corrupt: tensor {key} {what}; re-download it")

    spans = []
    for key, meta in header.items():
        if not isinstance(meta, dict):
            raise corrupt(key, f"has a header entry that is a JSON {type(meta).__name__}, not an object")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in meta:
                raise corrupt(key, f"lacks {field} in the header")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not _integers(offsets) or len(offsets) != 2:
            raise corrupt(key, f"has data_offsets {offsets!r}, not two integers")
        begin, end = offsets
        if begin < 0 or end < 0:
            raise corrupt(key, f"has negative data_offsets {offsets}")
        if end < begin:
            raise corrupt(key, f"has data_offsets {offsets} that end before they begin")
        if not _integers(shape) or any(d < 0 for d in shape):
            raise corrupt(key, f"has shape {shape!r}, not a list of sizes")
        if dtype not in DTYPE_BITS:
            raise corrupt(key, f"has dtype {dtype!r}, which is not a safetensors dtype")
        bits = math.prod(shape) * DTYPE_BITS[dtype]
        if bits != 8 * (end - begin):
            raise corrupt(key, f"spans {end - begin} bytes but its shape {shape} of {dtype} holds {bits / 8:g}")
        if end > data_bytes:
            raise MoestreamError(
                f"{path.name} is truncated: tensor {key} ends at byte {end} of the data, the file holds {data_bytes}; "
                "re-download it"
            )
        spans.append((begin, end, key))
    at, previous = 0, None
    for begin, end, key in sorted(spans):
        if begin < at:
            raise corrupt(key, f"overlaps tensor {previous} (data_offsets {[begin, end]})")
        if begin > at:
            raise corrupt(key, f"starts at byte {begin} of the data, leaving a gap after {previous or 'the header'}")
        at, previous = end, key
    if at != data_bytes:
        raise MoestreamError(f"{path.name} is corrupt: {data_bytes - at} bytes follow its last tensor; re-download it")


def text_name(key: str) -> str | None:
    """Map a stored tensor name to the text model's name (`model.layers...`, `lm_head.weight`).

    Returns None for vision-tower / projector tensors, which are not the text model's.
    """
    if key.startswith(VISION_PREFIXES):
        return None
    if key.startswith("language_model."):
        key = key[len("language_model."):]
    if key.startswith("model.language_model."):
        key = "model." + key[len("model.language_model."):]
    return key


class Checkpoint:
    """A validated Llama 4 checkpoint directory. Tensors are read on request.

    vision: index the vision tower's tensors (False = --no-vision: they are skipped with a note)."""

    def __init__(self, path: str | Path, config: ModelConfig | None = None, vision: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MoestreamError(misused_model_path(self.path) or f"model directory {self.path} does not exist")
        self.config = config or ModelConfig.from_file(self.path / "config.json")
        self.notes: list[str] = []  # one-line remarks for the user (e.g. ignored vision weights)
        self.tensors: dict[str, TensorInfo] = {}
        self.vision_tensors: dict[str, TensorInfo] = {}  # vision_model.* / multi_modal_projector.*, by stored name
        self.vision = vision
        self._handles: dict[Path, object] = {}
        self._fds: dict[Path, int] = {}
        self.expert_reads = 0  # experts sliced out of the files: proves laziness in tests
        self.expert_bytes_read = 0
        self._index_files()
        self.per_expert_keys = f"model.layers.{self._first_moe()}.feed_forward.experts.0.gate_proj.weight" in self.tensors
        self._validate_shapes()

    # --- discovery -----------------------------------------------------------------------------
    def _index_files(self) -> None:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
                raise MoestreamError(f"{index.name} is corrupt (no weight_map): re-download it") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.path / s).exists()]
            if missing:
                raise MoestreamError(
                    f"shard {missing[0]} listed in {index.name} is missing from {self.path}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    + ": finish the download"
                )
            files = [self.path / s for s in shards]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for pat in PICKLE_PATTERNS for p in self.path.glob(pat)]
            if pickles:
                raise MoestreamError(
                    f"{pickles[0]} is a pickle checkpoint; moestream loads only safetensors (never unpickles): "
                    "convert it with transformers' save_pretrained(..., safe_serialization=True)"
                )
            raise MoestreamError(f"no .safetensors weights in {self.path}")

        vision = 0
        for f in files:
            header, data_start = read_safetensors_header(f)
            for key, meta in header.items():
                name = text_name(key)
                info = TensorInfo(f, key, meta["dtype"], tuple(meta["shape"]), data_start + meta["data_offsets"][0])
                if name is None:
                    vision += 1
                    if self.vision:
                        self.vision_tensors[key] = info
                    continue
                self.tensors[name] = info
        if vision and not self.vision:
            self.notes.append(f"ignoring {vision} vision-tower tensors (--no-vision): this run reads text only")

    def _first_moe(self) -> int:
        return self.config.moe_layers[0] if self.config.moe_layers else -1

    # --- validation ----------------------------------------------------------------------------
    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        lm_head = not self.config.tie_word_embeddings or "lm_head.weight" in self.tensors
        return self.expected_shapes_for(self.config, self.per_expert_keys, lm_head)

    @staticmethod
    def expected_shapes_for(c: ModelConfig, per_expert_keys: bool = False, lm_head: bool = True) -> dict[str, tuple[int, ...]]:
        """Every text tensor a checkpoint of config `c` must hold, with its shape."""
        D, F, Fm, E = c.hidden_size, c.intermediate_size, c.intermediate_size_mlp, c.num_local_experts
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes = {"model.embed_tokens.weight": (c.vocab_size, D), "model.norm.weight": (D,)}
        if lm_head:
            shapes["lm_head.weight"] = (c.vocab_size, D)
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "self_attn.q_proj.weight": (q, D),
                p + "self_attn.k_proj.weight": (kv, D),
                p + "self_attn.v_proj.weight": (kv, D),
                p + "self_attn.o_proj.weight": (D, q),
                p + "input_layernorm.weight": (D,),
                p + "post_attention_layernorm.weight": (D,),
            }
            f = p + "feed_forward."
            if c.is_moe(i):
                shapes |= {
                    f + "router.weight": (E, D),
                    f + "shared_expert.gate_proj.weight": (F, D),
                    f + "shared_expert.up_proj.weight": (F, D),
                    f + "shared_expert.down_proj.weight": (D, F),
                }
                if per_expert_keys:
                    for e in range(E):
                        shapes |= {
                            f + f"experts.{e}.gate_proj.weight": (F, D),
                            f + f"experts.{e}.up_proj.weight": (F, D),
                            f + f"experts.{e}.down_proj.weight": (D, F),
                        }
                else:
                    shapes |= {f + "experts.gate_up_proj": (E, D, 2 * F), f + "experts.down_proj": (E, F, D)}
            else:
                shapes |= {
                    f + "gate_proj.weight": (Fm, D),
                    f + "up_proj.weight": (Fm, D),
                    f + "down_proj.weight": (D, Fm),
                }
        return shapes

    def _validate_shapes(self) -> None:
        for name, shape in self.expected_shapes().items():
            info = self.tensors.get(name)
            if info is None:
                raise MoestreamError(
                    f"checkpoint lacks tensor {name} that config.json implies: "
                    "the download is incomplete or config.json belongs to another model"
                )
            if info.shape != shape:
                raise MoestreamError(
                    f"tensor {name} in {info.shard.name} has shape {list(info.shape)} but config.json "
                    f"implies {list(shape)}: config.json does not match these weights"
                )
            if info.dtype == "F8_E4M3" and len(shape) >= 2:
                self._check_scale(name, shape)
            elif info.dtype not in FLOAT_DTYPES:
                raise MoestreamError(
                    f"tensor {name} is stored as {info.dtype}; moestream reads bf16/f16/f32 checkpoints and "
                    "fbgemm_fp8 ones (fp8 linear weights with per-output-channel scales)"
                )

    @staticmethod
    def scale_name(name: str) -> str:
        """Where an fp8 weight's scale lives: experts.gate_up_proj -> experts.gate_up_proj_scale (fused),
        x.weight -> x.weight_scale (nn.Linear and per-expert)."""
        return name + "_scale"

    @staticmethod
    def scale_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The fbgemm_fp8 scale shapes: one per output channel. Fused experts are x@W [E, in, out]:
        gate_up_proj_scale [E, 1, 2F], down_proj_scale [E, D, 1] (as transformers' FbgemmFp8Llama4TextExperts
        stores them); an nn.Linear weight [out, in] has weight_scale [out, 1]."""
        if name.endswith("experts.gate_up_proj"):
            return (shape[0], 1, shape[2])
        if name.endswith("experts.down_proj"):
            return (shape[0], shape[2], 1)
        return (shape[0], 1)

    def _check_scale(self, name: str, shape: tuple[int, ...]) -> None:
        scale, want = self.scale_name(name), self.scale_shape(name, shape)
        info = self.tensors.get(scale)
        if info is None:
            raise MoestreamError(f"tensor {name} is fp8 but its scale {scale} is missing: the checkpoint is incomplete "
                                 "or was not written by an fbgemm_fp8 exporter; re-download it")
        if info.shape != want or info.dtype not in FLOAT_DTYPES:
            raise MoestreamError(f"the fp8 scale {scale} has shape {list(info.shape)} of {info.dtype} but {name} "
                                 f"{list(shape)} needs {list(want)} of F32 (one per output channel): the checkpoint is "
                                 "malformed; re-download it")

    # --- reads -----------------------------------------------------------------------------------
    def _handle(self, shard: Path):
        h = self._handles.get(shard)
        if h is None:
            h = self._handles[shard] = safe_open(str(shard), framework="pt")
        return h

    def _raw(self, name: str) -> torch.Tensor:
        info = self.tensors.get(name) or self.vision_tensors[name]
        return self._handle(info.shard).get_tensor(info.key)

    def read_vision(self, name: str) -> torch.Tensor:
        """One vision-tower or projector tensor by its stored name (`vision_model.…`), as `read` does."""
        info = self.vision_tensors.get(name)
        if info is None:
            raise MoestreamError(f"checkpoint lacks tensor {name} that config.json's vision_config implies: the "
                                 "download is incomplete; re-download it (or --no-vision to load the text model alone)")
        if info.dtype not in FLOAT_DTYPES and not (info.dtype == "F8_E4M3" and self.scale_name(name) in self.vision_tensors):
            raise MoestreamError(f"tensor {name} is stored as {info.dtype}; moestream reads vision weights in bf16/f16/f32 "
                                 "(or fp8 with a scale): re-download the checkpoint, or --no-vision")
        return self.read(name)

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor (a non-expert weight); an fp8 one comes back dequantized to float32."""
        if name == "lm_head.weight" and name not in self.tensors:
            name = "model.embed_tokens.weight"  # tied embeddings
        w = self._raw(name)
        if w.dtype == torch.float8_e4m3fn:
            return w.float() * self._raw(self.scale_name(name)).float()  # weight [out, in] * scale [out, 1]
        return w

    def _slice(self, name: str, e: int) -> torch.Tensor:
        info = self.tensors[name]
        return self._handle(info.shard).get_slice(info.key)[e]

    def read_expert(self, layer: int, e: int) -> ExpertWeights:
        """One routed expert in x@W orientation: gate_up [D, 2F], down [F, D] (fp8 ones with their
        per-output-channel scales). Only this expert's bytes are read from the memory-mapped files."""
        f = f"model.layers.{layer}.feed_forward.experts."
        if self.per_expert_keys:
            gate, up, down = (self._raw(f + f"{e}.{n}_proj.weight") for n in ("gate", "up", "down"))
            # nn.Linear [out, in] -> x@W [in, out]
            if gate.dtype == torch.float8_e4m3fn:  # no cat for fp8 on the CPU: join the bytes (same size)
                gate_up = torch.cat([gate.t().view(torch.uint8), up.t().view(torch.uint8)], dim=1).view(gate.dtype)
            else:
                gate_up = torch.cat([gate.t(), up.t()], dim=1)
            weights = ExpertWeights(gate_up, down.t())
            if gate.dtype == torch.float8_e4m3fn:
                scales = [self._raw(f + f"{e}.{n}_proj.weight_scale").reshape(-1) for n in ("gate", "up", "down")]
                weights.gate_up_scale, weights.down_scale = torch.cat(scales[:2]), scales[2]
        else:
            weights = ExpertWeights(self._slice(f + "gate_up_proj", e), self._slice(f + "down_proj", e))
            if weights.gate_up.dtype == torch.float8_e4m3fn:
                weights.gate_up_scale = self._slice(f + "gate_up_proj_scale", e).reshape(-1)
                weights.down_scale = self._slice(f + "down_proj_scale", e).reshape(-1)
        self.expert_reads += 1
        self.expert_bytes_read += sum(t.numel() * t.element_size() for t in vars(weights).values() if t is not None)
        return weights

    @property
    def expert_dtype(self) -> torch.dtype:
        """How the routed experts are stored (what --expert-dtype auto keeps)."""
        f = f"model.layers.{self._first_moe()}.feed_forward.experts."
        name = f + ("0.gate_proj.weight" if self.per_expert_keys else "gate_up_proj")
        return SAFETENSORS_DTYPES[self.tensors[name].dtype] if name in self.tensors else self.dtype

    def reads_raw(self, fmt: ExpertFormat) -> bool:
        """Whether read_expert_into(..., fmt) is positioned reads alone, no torch op: the fused layout, in
        the format's own dtype."""
        if self.per_expert_keys or fmt.raw_dtype is None:
            return False
        f = f"model.layers.{self._first_moe()}.feed_forward.experts."
        parts = [self.tensors.get(f + "gate_up_proj"), self.tensors.get(f + "down_proj")]
        return all(p is not None and SAFETENSORS_DTYPES[p.dtype] == fmt.raw_dtype for p in parts)

    def read_expert_into(self, layer: int, e: int, out: torch.Tensor, fmt: ExpertFormat) -> None:
        """Fill a uint8 host buffer with one expert packed in `fmt` (the ExpertStore's layout).

        With the fused layout in the format's dtype this is two positioned reads straight into the
        buffer's two parts: no memory map, no temporary, so filling the host tier never holds a second
        copy. The offsets are trusted because read_safetensors_header checked every span against its
        shape and the file. Anything else is read, then packed (quantized, converted) by the format.
        """
        if out.device.type != "cpu" or not self.reads_raw(fmt):
            fmt.pack(self.read_expert(layer, e), out)
            return
        f = f"model.layers.{layer}.feed_forward.experts."
        dest = out.numpy()
        layout = fmt.layout(self.config.hidden_size, self.config.intermediate_size).parts
        read = 0
        for info, part in ((self.tensors[f + "gate_up_proj"], layout["gate_up"]), (self.tensors[f + "down_proj"], layout["down"])):
            nbytes = part.nbytes
            fd = self._fds.get(info.shard)
            if fd is None:
                fd = self._fds[info.shard] = os.open(info.shard, os.O_RDONLY)
            got = os.preadv(fd, [memoryview(dest[part.offset:part.offset + nbytes])], info.offset + e * nbytes)
            if got != nbytes:
                raise MoestreamError(f"{info.shard.name} ended early while reading expert {e} of layer {layer}: re-download it")
            read += nbytes
        self.expert_reads += 1
        self.expert_bytes_read += read

    def snapshot(self) -> CheckpointStats:
        return CheckpointStats(self.expert_reads, self.expert_bytes_read)

    def fingerprint(self) -> str:
        """Identifies these exact weight files (names, sizes, modification times)."""
        import hashlib

        h = hashlib.sha1(str(self.path.resolve()).encode())
        for shard in sorted({t.shard for t in self.tensors.values()}):
            st = shard.stat()
            h.update(f"{shard.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    @property
    def dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.tensors["model.embed_tokens.weight"].dtype]

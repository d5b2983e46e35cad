"""The official FP8 Llama 4 checkpoints (fbgemm_fp8) load unchanged, in both expert layouts.

Tiny random checkpoints are written as Meta's FP8 exports are: routed experts (and the shared
expert) as float8_e4m3fn with one float32 scale per output channel, `quantization_config` with
quant_method fbgemm_fp8 and modules_to_not_convert, attention and routers left in their dtype.
The oracle is transformers' own model with those weights replaced by their dequantized values.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import moestream
from moestream import MoestreamError

from .conftest import VOCAB, oracle_logits

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max


def quantize(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 weights and per-output-channel scales; `dim` is the input dimension the scale reduces over."""
    scale = w.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return (w / scale).to(torch.float8_e4m3fn), scale.float()


def write_fp8(src, dst, per_expert: bool):
    """Copy checkpoint `src` (a tiny fp32 one) to `dst` in the fbgemm_fp8 layout; returns the dequantized
    tensors under their transformers names (to load into the oracle)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):  # x@W [E, in, out]
            q, s = quantize(t, dim=1)
            dequantized[name] = q.float() * s
            if not per_expert:
                out[name], out[name + "_scale"] = q, s if name.endswith("gate_up_proj") else s.transpose(1, 2)
                continue
            base = name[: name.rindex("experts.") + len("experts.")]
            F = t.shape[2] // 2 if name.endswith("gate_up_proj") else t.shape[1]
            for e in range(t.shape[0]):
                w = q[e].view(torch.uint8).t().contiguous().view(torch.float8_e4m3fn)  # nn.Linear [out, in]
                se = s[e].t().contiguous()  # [out, 1]
                if name.endswith("gate_up_proj"):
                    out[f"{base}{e}.gate_proj.weight"], out[f"{base}{e}.gate_proj.weight_scale"] = w[:F].contiguous(), se[:F].contiguous()
                    out[f"{base}{e}.up_proj.weight"], out[f"{base}{e}.up_proj.weight_scale"] = w[F:].contiguous(), se[F:].contiguous()
                else:
                    out[f"{base}{e}.down_proj.weight"], out[f"{base}{e}.down_proj.weight_scale"] = w, se
        elif ".shared_expert." in name:  # nn.Linear [out, in]: scale [out, 1]
            q, s = quantize(t, dim=1)
            out[name], out[name + "_scale"] = q, s
            dequantized[name] = q.float() * s
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((dst / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                  "modules_to_not_convert": [f"model.layers.{i}.self_attn" for i in range(n)]
                                  + [f"model.layers.{i}.feed_forward.router" for i in range(n)] + ["lm_head"]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dequantized


def oracle_with(oracle, dequantized):
    import copy

    model = copy.deepcopy(oracle)
    state = model.state_dict()
    state.update(dequantized)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("per_expert", [False, True], ids=["fused", "per-expert"])
def test_fp8_checkpoint_matches_transformers_on_its_dequantized_weights(tiny, tmp_path, per_expert):
    path, oracle = tiny("scout")
    dequantized = write_fp8(path, tmp_path / "fp8", per_expert)
    ids = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(1))
    ref = oracle_logits(oracle_with(oracle, dequantized), ids)
    llm = moestream.load(tmp_path / "fp8", device="cpu")
    assert llm.config.quant_method == "fbgemm_fp8" and llm.checkpoint.per_expert_keys == per_expert
    assert llm.stats().experts.format == "fp8"  # auto keeps the checkpoint's own
    assert (llm.logits(ids) - ref).abs().max().item() < 1e-3
    assert (llm.decode_logits(ids) - ref).abs().max().item() < 1e-3


def test_fp8_experts_stay_fp8_in_the_store_and_offloaded_is_exact(tiny, tmp_path):
    path, _ = tiny("scout")
    write_fp8(path, tmp_path / "fp8", per_expert=False)
    ids = torch.randint(3, VOCAB, (29,), generator=torch.Generator().manual_seed(2))
    resident = moestream.load(tmp_path / "fp8")
    ref = resident.logits(ids)
    eb = resident.plan.expert_bytes
    c = resident.config
    assert eb < 3 * c.hidden_size * c.intermediate_size * 2  # under bf16's bytes: one byte a weight, plus scales
    for slots in (1, 3):
        llm = moestream.load(tmp_path / "fp8", expert_cache=slots * eb, cpu_mem=0, cpu_experts="never",
                             expert_dir=tmp_path / "experts")
        assert torch.equal(llm.logits(ids), ref)
        s = llm.stats()
        assert s.experts.bytes_per_expert == eb and s.experts.bytes_disk_to_host % eb == 0
        llm.close()


def test_malformed_fp8_scale_is_one_line(tiny, tmp_path):
    path, _ = tiny("scout")
    write_fp8(path, tmp_path / "fp8", per_expert=False)
    tensors = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    name = "model.layers.0.feed_forward.experts.gate_up_proj_scale"
    tensors[name] = tensors[name][:, :, :-1].contiguous()  # one output channel short
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(MoestreamError, match="fp8 scale .*gate_up_proj_scale has shape") as info:
        moestream.load(tmp_path / "fp8")
    assert "\n" not in str(info.value)
    del tensors[name]
    save_file(tensors, str(tmp_path / "fp8" / "model.safetensors"))
    with pytest.raises(MoestreamError, match="is fp8 but its scale .* is missing"):
        moestream.load(tmp_path / "fp8")


def test_unknown_quantization_method_is_one_line(tiny, tmp_path):
    path, _ = tiny("scout")
    dst = tmp_path / "q"
    shutil.copytree(path, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoestreamError, match="quant_method 'gptq' is not one moestream reads") as info:
        moestream.load(dst)
    assert "\n" not in str(info.value)

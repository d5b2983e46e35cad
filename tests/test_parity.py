"""moestream reproduces transformers' Llama 4 exactly (fp32, CPU) on tiny random checkpoints."""

import pytest
import torch

import moestream
from moestream.model.sampling import SamplingParams

from .conftest import VARIANTS, VOCAB, oracle_logits, text_oracle

TOL = 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(tiny, name):
    path, oracle = tiny(name)
    ids = torch.randint(3, VOCAB, (37,), generator=torch.Generator().manual_seed(1))  # 37 tokens > 4 chunks of 8
    ref = oracle_logits(oracle, ids)
    llm = moestream.load(path, device="cpu")
    assert llm.config.is_multimodal == (name == "multimodal")
    whole = llm.logits(ids)
    stepped = llm.decode_logits(ids)
    assert whole.shape == ref.shape == (37, VOCAB)
    assert (whole - ref).abs().max().item() < TOL
    assert (stepped - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["scout", "maverick", "multimodal"])
def test_greedy_generation_matches_transformers(tiny, name):
    path, oracle = tiny(name)
    prompt = torch.randint(3, VOCAB, (21,), generator=torch.Generator().manual_seed(2))
    lm = text_oracle(oracle)
    with torch.no_grad():
        ref = lm.generate(prompt[None], max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[0, prompt.numel():].tolist()
    llm = moestream.load(path, device="cpu")
    ours = llm.generate_ids(prompt.tolist(), SamplingParams(temperature=0, max_tokens=24), stop_ids=set())
    assert ours == ref


def test_config_dialects_agree(tiny):
    """The 4.51 dialect (rope_scaling, no derived lists) is read to the same architecture."""
    new = moestream.load(tiny("scout")[0]).config
    old = moestream.load(tiny("dialect451")[0]).config
    for field in ("rope_layers", "moe_layers", "rope_scaling", "rope_theta", "use_qk_norm", "attention_chunk_size"):
        assert getattr(new, field) == getattr(old, field), field
    assert new.rope_scaling is not None and new.rope_scaling.factor == 8.0


def test_maverick_schedule(tiny):
    cfg = moestream.load(tiny("maverick")[0]).config
    assert cfg.moe_layers == [1, 3, 5, 7]
    assert cfg.global_layers == [3, 7]
    assert not cfg.use_qk_norm


def test_per_expert_key_variant(tiny, tmp_path):
    """Exports with experts.{e}.{gate,up,down}_proj.weight (nn.Linear orientation) load to the same logits."""
    from safetensors.torch import load_file, save_file

    path, oracle = tiny("scout")
    tensors = load_file(str(path / "model.safetensors"))
    out = {}
    for name, t in tensors.items():
        if name.endswith("experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            F = t.shape[2] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :, :F].t().contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, :, F:].t().contiguous()
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].t().contiguous()
        else:
            out[name] = t
    save_file(out, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    ids = torch.randint(3, VOCAB, (19,), generator=torch.Generator().manual_seed(3))
    llm = moestream.load(tmp_path)
    assert llm.checkpoint.per_expert_keys
    assert (llm.logits(ids) - oracle_logits(oracle, ids)).abs().max().item() < TOL


def test_vision_weights_load_with_a_note(tiny):
    llm = moestream.load(tiny("multimodal")[0])
    assert any("vision" in note for note in llm.notes)
    assert not any(k.startswith("vision_model") for k in llm.checkpoint.tensors)


def test_sharded_checkpoint_has_many_files(tiny):
    path, _ = tiny("sharded")
    assert len(list(path.glob("*.safetensors"))) >= 3
    assert (path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_gives_the_reference_formulas_bits(dtype):
    """transformers' Llama4TextRMSNorm: float32 statistics, rounded to the input dtype, then the weight."""
    from moestream.model.llama4 import rms_norm

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 128), (7, 5120), (3, 6, 32)]:
        x = (torch.randn(*shape, generator=g) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=g).to(dtype)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x)
        assert torch.equal(rms_norm(x, None, 1e-5), normed)
        assert torch.equal(rms_norm(x, w, 1e-5), normed * w)

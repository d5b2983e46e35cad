import torch

from moestream.model.sampling import SamplingParams, apply_repetition_penalty, sample


def logits():
    return torch.tensor([0.1, 2.0, -1.0, 1.5, 0.0])


def test_greedy_and_top_k_1_pick_the_argmax():
    none = torch.tensor([], dtype=torch.long)
    assert sample(logits(), SamplingParams(temperature=0), none, None) == 1
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits(), SamplingParams(temperature=5, top_k=1), none, g) == 1 for _ in range(20))


def test_top_p_keeps_the_smallest_set_covering_p():
    none = torch.tensor([], dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    # softmax: token 1 has ~0.53, token 3 ~0.32: top_p=0.6 keeps exactly {1, 3}
    seen = {sample(logits(), SamplingParams(temperature=1, top_k=0, top_p=0.6), none, g) for _ in range(200)}
    assert seen == {1, 3}


def test_seed_makes_sampling_reproducible():
    none = torch.tensor([], dtype=torch.long)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0)
    a = [sample(logits(), p, none, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [sample(logits(), p, none, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b


def test_repetition_penalty_rule():
    out = apply_repetition_penalty(logits(), torch.tensor([1, 2]), 2.0)
    assert torch.allclose(out, torch.tensor([0.1, 1.0, -2.0, 1.5, 0.0]))

import dataclasses
import subprocess
import sys

import pytest
import torch

from moestream.errors import MoestreamError
from moestream.model.sampling import SEED_MAX, SamplingParams
from moestream.scheduler.generate import apply_repetition_penalty, sample


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


# --- one validation for every way settings arrive -----------------------------------------------

NAN, INF = float("nan"), float("inf")
BAD = [
    # (field, value, words the one line must hold)
    ("temperature", NAN, "temperature nan must be a finite number >= 0"),
    ("temperature", INF, "temperature inf must be a finite number >= 0"),
    ("temperature", -INF, "temperature -inf"),
    ("temperature", -0.1, "temperature -0.1"),
    ("temperature", True, "temperature True"),
    ("temperature", "0.8", "temperature '0.8'"),
    ("temperature", None, "temperature None"),
    ("temperature", 10**400, "temperature 1000000000"),  # too large for a float
    ("top_k", -1, "top-k -1 must be a whole number >= 0"),
    ("top_k", 1.5, "top-k 1.5"),
    ("top_k", 40.0, "top-k 40.0"),
    ("top_k", True, "top-k True"),
    ("top_k", None, "top-k None"),
    ("top_p", 0, "top-p 0 must be a number in (0, 1]"),
    ("top_p", 0.0, "top-p 0.0"),
    ("top_p", -0.5, "top-p -0.5"),
    ("top_p", 1.0000001, "top-p 1.0000001"),
    ("top_p", NAN, "top-p nan"),
    ("top_p", INF, "top-p inf"),
    ("top_p", False, "top-p False"),
    ("repetition_penalty", 1e-300, "repeat penalty 1e-300 must be a number from 0.01 to 100"),
    ("repetition_penalty", 0, "repeat penalty 0 "),
    ("repetition_penalty", 0.0099, "repeat penalty 0.0099"),
    ("repetition_penalty", 100.5, "repeat penalty 100.5"),
    ("repetition_penalty", 1e300, "repeat penalty 1e+300"),
    ("repetition_penalty", -1.0, "repeat penalty -1.0"),
    ("repetition_penalty", NAN, "repeat penalty nan"),
    ("repetition_penalty", INF, "repeat penalty inf"),
    ("repetition_penalty", True, "repeat penalty True"),
    ("seed", -1, "seed -1 must be a whole number from 0 to 2^63-1"),
    ("seed", 2**63, f"seed {2**63} must"),
    ("seed", 2**64, "seed 18446744073709551616 must"),
    ("seed", 10**5000, "seed (a very long number) must"),  # too long even to print
    ("seed", 7.0, "seed 7.0"),
    ("seed", NAN, "seed nan"),
    ("seed", True, "seed True"),
    ("max_tokens", 0, "max tokens 0 must be a whole number >= 1"),
    ("max_tokens", -5, "max tokens -5"),
    ("max_tokens", 1.5, "max tokens 1.5"),
    ("max_tokens", INF, "max tokens inf"),
    ("max_tokens", True, "max tokens True"),
    ("max_tokens", None, "max tokens None"),
    ("ignore_eos", 1, "ignore-eos 1 must be true or false"),
    ("ignore_eos", "yes", "ignore-eos 'yes'"),
    ("ignore_eos", None, "ignore-eos None"),
]


@pytest.mark.parametrize("field,value,words", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_every_bad_setting_is_one_line(field, value, words):
    with pytest.raises(MoestreamError) as e:
        SamplingParams(**{field: value})
    message = str(e.value)
    assert words in message and "\n" not in message and len(message) < 160


@pytest.mark.parametrize("field,value", [(f, v) for f, v, _ in BAD[:12] + BAD[29:32]])
def test_replace_checks_again_and_a_checked_object_cannot_be_changed(field, value):
    p = SamplingParams()
    with pytest.raises(MoestreamError):
        dataclasses.replace(p, **{field: value})
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(p, field, value)
    assert p == SamplingParams()


@pytest.mark.parametrize("field,value", [
    ("temperature", 0), ("temperature", 0.0), ("temperature", 1e-300), ("temperature", 1e300),
    ("top_k", 0), ("top_k", 10**30), ("top_p", 1), ("top_p", 1e-300), ("repetition_penalty", 0.01),
    ("repetition_penalty", 100), ("seed", 0), ("seed", SEED_MAX), ("seed", None), ("max_tokens", 1),
    ("ignore_eos", True),
])
def test_edge_values_are_accepted(field, value):
    assert getattr(SamplingParams(**{field: value}), field) == value


@pytest.mark.parametrize("field,text,words", [
    ("temperature", "hot", "temperature needs a number, not 'hot'"),
    ("temperature", "nan", "temperature nan must be"),  # parsed, then refused by the one check
    ("temperature", "1e999", "temperature inf must be"),
    ("top_k", "2.5", "top-k needs a whole number, not '2.5'"),
    ("top_k", "0x10", "top-k needs a whole number"),
    ("seed", "18446744073709551616", "seed 18446744073709551616 must"),
    ("seed", "-1", "seed -1 must"),
    ("seed", "lucky", "seed needs a whole number or none, not 'lucky'"),
    ("seed", "9" * 5000, "seed needs a whole number"),  # longer than int() converts
    ("max_tokens", "1e3", "max tokens needs a whole number, not '1e3'"),
    ("repetition_penalty", "1e-300", "repeat penalty 1e-300 must"),
    ("ignore_eos", "maybe", "ignore-eos needs true or false"),
    ("colour", "blue", "'colour' is not a sampling setting"),
])
def test_typed_text_is_parsed_then_checked(field, text, words):
    with pytest.raises(MoestreamError) as e:
        SamplingParams.build(**{field: text})
    assert words in str(e.value) and "\n" not in str(e.value)


def test_typed_text_that_is_good():
    p = SamplingParams.build(temperature=" 0 ", top_k="7", top_p="1", repetition_penalty="1.1", seed="none",
                                 max_tokens="3", ignore_eos=True)
    assert p == SamplingParams(temperature=0.0, top_k=7, top_p=1.0, repetition_penalty=1.1, seed=None, max_tokens=3,
                               ignore_eos=True)
    assert SamplingParams.build(seed=str(SEED_MAX)).seed == SEED_MAX


def test_a_tiny_temperature_is_greedy_not_nan():
    none = torch.tensor([], dtype=torch.long)
    for t in (1e-300, 5e-324, 1e-40, 1e-30):
        assert sample(logits(), SamplingParams(temperature=t), none, torch.Generator().manual_seed(0)) == 1


def test_the_penalty_range_keeps_logits_finite_and_nonzero():
    big = torch.tensor([1e30, -1e30, 3e-38, -3e-38])
    for penalty in (0.01, 100.0):
        out = apply_repetition_penalty(big, torch.arange(4), penalty)
        assert torch.isfinite(out).all() and (out != 0).all()


@pytest.mark.parametrize("kwargs,words", [
    (dict(temperature=NAN), "temperature nan"),
    (dict(seed=2**64), "seed 18446744073709551616"),
    (dict(max_tokens=0), "max tokens 0"),
    (dict(top_p=0.0), "top-p 0.0"),
    (dict(repetition_penalty=1e-300), "repeat penalty 1e-300"),
    (dict(top_k=True), "top-k True"),
])
def test_llm_generate_keywords_are_checked(embedded, kwargs, words):
    with pytest.raises(MoestreamError, match=words.replace("+", r"\+")):
        embedded.generate("ROMEO:", **kwargs)
    assert embedded.generate("ROMEO:", max_tokens=2, temperature=0)  # still fine afterwards


@pytest.mark.parametrize("flags,words", [
    (["--temp", "nan"], "temperature nan must be a finite number >= 0"),
    (["--temp", "inf"], "temperature inf must be"),
    (["--repeat-penalty", "1e-300"], "repeat penalty 1e-300 must be a number from 0.01 to 100"),
    (["-s", "18446744073709551616"], "seed 18446744073709551616 must be a whole number from 0 to 2^63-1"),
    (["-s", "-1"], "seed -1 must be"),
    (["--top-p", "0"], "top-p 0.0 must be a number in (0, 1]"),
    (["-n", "0"], "max tokens 0 must be a whole number >= 1"),
    (["--top-k", "many"], "top-k needs a whole number, not 'many'"),
])
@pytest.mark.parametrize("command", [["generate", "-p", "ROMEO:"], ["chat"]])
def test_bad_sampling_flags_are_one_error_line(command, flags, words):
    r = subprocess.run([sys.executable, "-m", "moestream", *command, *flags], capture_output=True, text=True,
                       timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr == f"error: {r.stderr.removeprefix('error: ')}" and r.stderr.count("\n") == 1, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr + r.stdout

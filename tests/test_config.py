import pytest

from moestream import MoestreamError
from moestream.config import parse_count, parse_size


@pytest.mark.parametrize("text,value", [
    ("40GiB", 40 * 2**30), ("40GB", 40 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
    ("123", 123), ("0", 0), ("2 gib", 2 * 2**30), (4096, 4096),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "12 parsecs", "1e9", "4..2GB", -5])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(MoestreamError) as info:
        parse_size(text, "--gpu-mem")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,value", [("4096", 4096), ("32k", 32000), ("32K", 32768), ("1M", 2**20), ("1m", 10**6)])
def test_counts(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "abc", "1G", "", "k"])
def test_bad_counts(text):
    with pytest.raises(MoestreamError):
        parse_count(text)


# --- the one parser every command uses, fuzzed --------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_any_text_is_a_size_or_one_clear_line(text):
    try:
        value = parse_size(text, "--gpu-mem")
    except MoestreamError as e:
        assert "\n" not in str(e) and "--gpu-mem" in str(e)
    else:
        assert isinstance(value, int) and value >= 0


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(UNITS)), st.sampled_from(["", " "]),
       st.booleans())
def test_sizes_round_trip(number, unit, space, lower):
    text = f"{number}{space}{unit.lower() if lower else unit}"
    assert parse_size(text) == number * UNITS[unit]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=8))
def test_any_text_is_a_context_or_one_clear_line(text):
    try:
        value = parse_count(text, "-c")
    except MoestreamError as e:
        assert "\n" not in str(e)
    else:
        assert value > 0


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=10**5), st.sampled_from(["", "k", "K", "m", "M"]))
def test_contexts_round_trip(number, unit):
    assert parse_count(f"{number}{unit}") == number * {"": 1, "k": 10**3, "K": 2**10, "m": 10**6, "M": 2**20}[unit]

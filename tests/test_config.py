import pytest

from moestream import MoestreamError
from moestream.units import fmt_size, is_binary, parse_count, parse_size


@pytest.mark.parametrize("text,value", [
    ("40GiB", 40 * 2**30), ("40GB", 40 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)),
    ("123", 123), ("0", 0), ("2 gib", 2 * 2**30), (4096, 4096), ("0.5KB", 500), ("1.5KiB", 1536), (".5MB", 500000),
])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "12 parsecs", "1e9", "4..2GB", -5,
                                  "1.5", "1.5B", "1.0001KB", "0.3KiB", "\u0663GB"])
def test_bad_sizes_are_one_line(text):
    with pytest.raises(MoestreamError) as info:
        parse_size(text, "--gpu-mem")
    assert "\n" not in str(info.value) and "--gpu-mem" in str(info.value)


@pytest.mark.parametrize("text", ["0.9", ".8", "0.95"])
def test_a_fraction_is_not_a_budget(text):
    """vLLM users write --gpu-memory-utilization 0.9; our budgets are bytes with a unit."""
    with pytest.raises(MoestreamError, match=r"fraction.*bytes with a unit: use e\.g\. 40GiB or 512MiB"):
        parse_size(text, "--gpu-mem")


@pytest.mark.parametrize("n,text", [(80 * 2**30, "80 GiB"), (80 * 10**9, "80 GB"), (3 * 2**29, "1.5 GiB"),
                                    (512 * 2**20, "512 MiB"), (500, "500 B"), (0, "0 B"), (2**40, "1 TiB")])
def test_budgets_read_back_as_typed(n, text):
    assert fmt_size(n) == text
    assert is_binary(n) == (not text.endswith((" GB", " MB", " kB", " TB")))


@pytest.mark.parametrize("text,value", [("4096", 4096), ("32k", 32000), ("32K", 32768), ("1M", 2**20), ("1m", 10**6)])
def test_counts(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "abc", "1G", "", "k", "0.5", "1.5", "0.0001k"])
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
    if unit not in ("", "B"):  # a size typed with a unit is shown back as typed: same number, same unit
        shown = fmt_size(parse_size(text))
        assert parse_size(shown.replace(" ", "")) == number * UNITS[unit]
        assert shown.split()[-1].lower() == {"kb": "kb"}.get(unit.lower(), unit.lower())
        assert ("iB" in shown) == ("i" in unit)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=99),
       st.sampled_from(sorted(UNITS)))
def test_fractional_sizes_are_whole_bytes_or_refused(number, hundredths, unit):
    """Exact arithmetic: 1.5GiB is 1,610,612,736 bytes; 1.5 bytes is refused, never rounded."""
    text = f"{number}.{hundredths:02d}{unit}"
    exact = (number * 100 + hundredths) * UNITS[unit]
    if exact % 100:
        with pytest.raises(MoestreamError):
            parse_size(text, "--gpu-mem")
    else:
        assert parse_size(text) == exact // 100


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

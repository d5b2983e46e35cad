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

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manager.errors import InvalidInput
from manager.sizes import exact_size, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10G", 10 * 1024**3),
        ("10GiB", 10 * 1024**3),
        ("10gb", 10 * 1024**3),
        ("512M", 512 * 1024**2),
        ("1.5G", int(1.5 * 1024**3)),
        (" 2T ", 2 * 1024**4),
        ("64KiB", 65536),
        (4096, 4096),
    ],
)
def test_parses_what_admins_write(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["10", "ten G", "10X", "-1G", "0G", "", "1.2.3G", 0])
def test_refuses_and_says_what_is_accepted(text: str | int) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_size(text)
    assert "G" in err.value.message or "positive" in err.value.message


def test_format_is_binary() -> None:
    assert format_size(10 * 1024**3) == "10.0 GiB"
    assert format_size(512) == "512 B"
    assert format_size(1536 * 1024**2) == "1.5 GiB"


@given(st.integers(min_value=1, max_value=10**14))
def test_exact_size_reads_back_to_the_same_bytes(value: int) -> None:
    assert parse_size(exact_size(value)) == value


def test_exact_size_is_what_an_admin_writes() -> None:
    assert [exact_size(v) for v in (1536 * 1024**2, 10 * 1024**3, 64 * 1024, 1000)] == ["1536M", "10G", "64K", "1000B"]

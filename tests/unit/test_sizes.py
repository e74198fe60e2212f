import pytest

from manager.errors import InvalidInput
from manager.sizes import format_size, parse_size


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

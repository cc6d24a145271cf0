"""The terminal stream masker: any split of a stream masks exactly like the whole text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.masking import Masker
from pcigate.models import MaskingPolicy
from pcigate.termmask import StreamMasker

MASKER = Masker(MaskingPolicy(track_data=False))
PANS = ["4111111111111111", "4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"]
pieces = st.one_of(st.sampled_from(PANS), st.text(alphabet="0123456789 -ab\r\n\x1b[;m", max_size=12))


@settings(max_examples=400)
@given(st.lists(pieces, max_size=12), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_any_split_masks_like_the_whole(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    sm = StreamMasker(MASKER)
    out = "".join(sm.feed(c) for c in chunks) + sm.flush()
    assert out == MASKER.mask_text(text)


def test_a_pan_typed_digit_by_digit_never_leaves_in_clear() -> None:
    sm = StreamMasker(MASKER)
    out = [sm.feed(ch) for ch in "echo 4111111111111111"]
    assert "".join(out) == "echo "  # the digits are held until the run ends
    assert sm.pending
    out.append(sm.feed("\r\n"))
    assert "".join(out) == "echo 411111******1111\r\n"


def test_utf8_split_between_reads_is_kept_whole() -> None:
    sm = StreamMasker(MASKER)
    data = "café 4111111111111111 ok".encode()
    out = "".join(sm.feed_bytes(data[i : i + 1]) for i in range(len(data))) + sm.flush()
    assert out == "café 411111******1111 ok"


def test_a_long_run_is_not_held_forever() -> None:
    sm = StreamMasker(MASKER, max_hold=64)
    assert sm.feed("1" * 100) == "1" * 100
    assert not sm.pending


def test_no_policy_passes_everything() -> None:
    sm = StreamMasker(None)
    assert sm.feed("4111111111111111") == "4111111111111111"


@settings(max_examples=300)
@given(st.lists(pieces, max_size=12), st.lists(st.integers(min_value=0, max_value=200), max_size=8),
       st.lists(st.booleans(), max_size=10))
def test_the_screen_sees_every_character_once_and_the_recording_only_whole_runs(
        parts: list[str], cuts: list[int], peeks: list[bool]) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    sm = StreamMasker(MASKER)
    screen, record = [], []
    for i, chunk in enumerate(chunks):
        released = sm.feed(chunk)
        record.append(released)
        screen.append(sm.screen(released))
        if i < len(peeks) and peeks[i]:  # a pause: the screen is shown what is held
            screen.append(sm.peek())
    released = sm.flush()
    record.append(released)
    screen.append(sm.screen(released))
    assert "".join(record) == MASKER.mask_text(text)
    assert len("".join(screen)) == len(text)
    if not any(peeks):
        assert "".join(screen) == MASKER.mask_text(text)


def test_typing_shows_each_digit_after_a_pause_but_records_the_number_masked() -> None:
    sm = StreamMasker(MASKER)
    screen, record = [], []
    for ch in f"{PANS[0]}\r":
        released = sm.feed(ch)
        record.append(released)
        screen.append(sm.screen(released) + sm.peek())
    assert "".join(screen) == f"{PANS[0]}\r"  # the typist's own echo, one digit at a time
    assert "".join(record) == "411111******1111\r"

"""The terminal stream masker: any split of a stream masks exactly like the whole text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pcigate.masking import Masker
from pcigate.models import MaskingPolicy
from pcigate.termmask import StreamMasker, mask_terminal

MASKER = Masker(MaskingPolicy(track_data=False))
PANS = ["4111111111111111", "4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005"]
SGR = ["\x1b[01;31m\x1b[K", "\x1b[m\x1b[K", "\x1b[0m", "\x1b[1;32m", "\x1b[2J", "\x1b[10;4H",
       "\x1b(B\x1b[m", "\x1b(0"]
pieces = st.one_of(st.sampled_from(PANS), st.sampled_from(SGR),
                   st.text(alphabet="0123456789 -ab\r\n\x1b[;m(B", max_size=12))


@settings(max_examples=400)
@given(st.lists(pieces, max_size=12), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_any_split_masks_like_the_whole(parts: list[str], cuts: list[int]) -> None:
    text = "".join(parts)
    bounds = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]
    sm = StreamMasker(MASKER)
    out = "".join(sm.feed(c) for c in chunks) + sm.flush()
    assert out == mask_terminal(MASKER, text)
    assert len(out) == len(text)
    assert all(a == b or a == "*" for a, b in zip(out, text, strict=True))  # only masking changes it
    raw = _no_designation_digits(text)  # a designation's final byte (ESC ( 0) is no digit of a number
    assert _covers(out, raw, MASKER.mask_text(raw))  # what masking the raw text masks
    visible = [i for i in range(len(text)) if not _in_csi(text, i)]  # what the screen shows, masked
    assert _covers("".join(out[i] for i in visible), "".join(text[i] for i in visible),
                   MASKER.mask_text("".join(text[i] for i in visible)))


TRACK_MASKER = Masker(MaskingPolicy())  # the default policy: track data masked too
TRACKS = ["%B4111111111111111^DOE/JOHN^2512101000000000000?", "B4111 1111 1111 1111^MÜLLER^251210100",
          ";4111111111111111=25121010000000000?", "4111111111111111=2512101", "5500000000000004=2501"]
track_text = st.text(alphabet="0123456789 -=^;%?BaZ/\r\n", max_size=12)


def _split(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)], strict=True)]


@settings(max_examples=500)
@given(st.lists(st.one_of(st.sampled_from(TRACKS), st.sampled_from(PANS), track_text), max_size=10),
       st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_track_data_split_anywhere_masks_like_the_whole(parts: list[str], cuts: list[int]) -> None:
    """Track data arriving in pieces (a 4 KiB read ending inside a track) is held until it ends, so its
    name, expiry and discretionary data are masked as in the whole text (before: only the PAN rule)."""
    text = "".join(parts)
    sm = StreamMasker(TRACK_MASKER)
    out = "".join(sm.feed(c) for c in _split(text, cuts)) + sm.flush()
    assert out == mask_terminal(TRACK_MASKER, text)


@settings(max_examples=300)
@given(st.lists(st.one_of(st.sampled_from(TRACKS), st.sampled_from(PANS), st.sampled_from(SGR), track_text),
                max_size=10),
       st.lists(st.integers(min_value=0, max_value=300), max_size=8))
def test_track_data_with_colours_split_anywhere_masks_at_least_the_raw_text(
        parts: list[str], cuts: list[int]) -> None:
    """With control sequences among track data (grep --color highlighting part of a card swipe) the pieces
    are cut where neither the text as the screen shows it nor the raw stream splits a track: at least
    everything that masking the whole masks either way is masked."""
    text = "".join(parts)
    sm = StreamMasker(TRACK_MASKER)
    out = "".join(sm.feed(c) for c in _split(text, cuts)) + sm.flush()
    assert len(out) == len(text)
    raw = _no_designation_digits(text)
    assert _covers(out, raw, TRACK_MASKER.mask_text(raw))
    visible = [i for i in range(len(text)) if not _in_csi(text, i)]
    assert _covers("".join(out[i] for i in visible), "".join(text[i] for i in visible),
                   TRACK_MASKER.mask_text("".join(text[i] for i in visible)))


def test_a_forced_release_keeps_an_unfinished_track_back() -> None:
    """Past max_hold what is held goes out masked as it stands, but not a track still arriving at its end."""
    sm = StreamMasker(TRACK_MASKER, max_hold=64)
    first = sm.feed("1 " * 40 + "4111111111111111=25")
    assert first.startswith("1 1 ")
    out = first + sm.feed("121010000000000?\n") + sm.flush()
    assert out.endswith("*" * len("4111111111111111=25121010000000000?") + "\n")


def test_a_card_swipe_grep_colours_is_masked_whole_however_split() -> None:
    """grep --color 4111 (or 2512) inside track 1 data: a read ending after the colour code no longer lets
    the name and expiry date out (found in review)."""
    hl, end = "\x1b[01;31m\x1b[K", "\x1b[m\x1b[K"
    for line in (f"%B{hl}4111{end}111111111111^DOE/JOHN^2512101000000000000?\n",
                 f"%B4111111111111111^DOE/JOHN^{hl}2512{end}101000000000000?\n"):
        whole = mask_terminal(TRACK_MASKER, line)
        assert "DOE" not in whole
        for cut in range(len(line) + 1):
            sm = StreamMasker(TRACK_MASKER)
            assert sm.feed(line[:cut]) + sm.feed(line[cut:]) + sm.flush() == whole


@settings(max_examples=300)
@given(st.lists(st.one_of(st.sampled_from(TRACKS), st.sampled_from(SGR), track_text), max_size=10),
       st.lists(st.integers(min_value=0, max_value=300), max_size=8), st.lists(st.booleans(), max_size=10))
def test_held_track_data_reaches_the_screen_once(
        parts: list[str], cuts: list[int], peeks: list[bool]) -> None:
    text = "".join(parts)
    sm = StreamMasker(TRACK_MASKER)
    screen = []
    for i, chunk in enumerate(_split(text, cuts)):
        screen.append(sm.screen(sm.feed(chunk)))
        if i < len(peeks) and peeks[i]:
            screen.append(sm.peek())
    screen.append(sm.screen(sm.flush()))
    assert len("".join(screen)) == len(text)


def test_a_pause_inside_a_track_shows_the_screen_no_name() -> None:
    sm = StreamMasker(TRACK_MASKER)
    screen = [sm.screen(sm.feed("log: %B4111111111111111^DOE/")), sm.peek()]
    assert screen == ["log: ", "*" * len("%B4111111111111111^DOE/")]
    screen.append(sm.screen(sm.feed("JOHN^2512101000000000000?\n")))
    assert "".join(screen) == "log: " + "*" * len(TRACK) + "\n"


def test_a_pause_inside_a_coloured_track_shows_the_screen_no_name() -> None:
    sm = StreamMasker(TRACK_MASKER)
    head = "%B\x1b[01;31m\x1b[K4111\x1b[m\x1b[K111111111111^DOE/"
    assert sm.screen(sm.feed(head)) == ""
    assert "DOE" not in sm.peek()


def test_a_track_split_between_reads_is_masked_whole() -> None:
    line = f"log: {TRACK} done\n"
    want = f"log: {'*' * len(TRACK)} done\n"
    for cut in range(len(line) + 1):
        sm = StreamMasker(TRACK_MASKER)
        first = sm.feed(line[:cut])
        assert "DOE" not in first
        assert "2512" not in first
        assert first + sm.feed(line[cut:]) + sm.flush() == want


def _no_designation_digits(text: str) -> str:
    import re

    return re.sub(r"\x1b[()*+][0-9]", lambda m: m[0][:2] + "\x00", text)


def _covers(out: str, text: str, masked: str) -> bool:
    """Every character ``masked`` changed in ``text`` is changed in ``out`` too."""
    return all(o != t for o, t, m in zip(out, text, masked, strict=True) if m != t)


def _in_csi(text: str, i: int) -> bool:
    import re

    seqs = re.finditer(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()*+][0-~])", text)
    return any(m.start() <= i < m.end() for m in seqs)


def test_a_pan_coloured_by_grep_is_masked_and_keeps_its_colours() -> None:
    """grep --color 4111: the match is wrapped in escape sequences, in the middle of the number."""
    line = "card: \x1b[01;31m\x1b[K4111\x1b[m\x1b[K111111111111 ok\n"
    want = "card: \x1b[01;31m\x1b[K4111\x1b[m\x1b[K11******1111 ok\n"
    assert mask_terminal(MASKER, line) == want
    for cut in range(len(line) + 1):  # and however the output is split between reads
        sm = StreamMasker(MASKER)
        first = sm.feed(line[:cut])
        assert "4111\x1b[m\x1b[K111111" not in first
        assert first + sm.feed(line[cut:]) + sm.flush() == want


def test_two_numbers_a_colour_apart_are_both_masked() -> None:
    line = "4111111111111111\x1b[01;31m\x1b[K4111111111111111\x1b[m"
    assert mask_terminal(MASKER, line) == "411111******1111\x1b[01;31m\x1b[K411111******1111\x1b[m"


def test_a_pan_split_by_tput_sgr0_is_masked() -> None:
    """``tput sgr0`` emits a character-set designation before the reset: invisible on the screen too."""
    line = "4111\x1b(B\x1b[m111111111111\n"
    assert mask_terminal(MASKER, line) == "4111\x1b(B\x1b[m11******1111\n"


TRACK = "%B4111111111111111^DOE/JOSÉ^2512101000000000000?"


def test_track_data_with_a_multibyte_name_keeps_the_colours_and_masks_both_numbers() -> None:
    """Track masking goes byte by byte; a name with multi-byte characters must not change the length, or
    the sequences could not be put back (before: the colours went, and two numbers a colour apart with
    them stayed in clear)."""
    masker = Masker(MaskingPolicy())
    line = f"{TRACK} 4111111111111111\x1b[01;31m\x1b[K4111111111111111\x1b[m\x1b[K\n"
    out = mask_terminal(masker, line)
    assert len(out) == len(line)
    assert out == "*" * len(TRACK) + " 411111******1111\x1b[01;31m\x1b[K411111******1111\x1b[m\x1b[K\n"
    for cut in range(len(line) + 1):
        sm = StreamMasker(masker)
        assert sm.feed(line[:cut]) + sm.feed(line[cut:]) + sm.flush() == out


def test_a_colour_reset_after_text_is_not_held() -> None:
    sm = StreamMasker(MASKER)
    assert sm.feed("ok \x1b[0m") == "ok \x1b[0m"
    assert not sm.pending
    assert sm.feed("\x1b[31m4111") == ""  # a run that may go on is held, its colour with it
    assert sm.pending


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
    assert "".join(record) == mask_terminal(MASKER, text)
    assert len("".join(screen)) == len(text)
    if not any(peeks):
        assert "".join(screen) == mask_terminal(MASKER, text)


def test_typing_shows_each_digit_after_a_pause_but_records_the_number_masked() -> None:
    sm = StreamMasker(MASKER)
    screen, record = [], []
    for ch in f"{PANS[0]}\r":
        released = sm.feed(ch)
        record.append(released)
        screen.append(sm.screen(released) + sm.peek())
    assert "".join(screen) == f"{PANS[0]}\r"  # the typist's own echo, one digit at a time
    assert "".join(record) == "411111******1111\r"


def test_what_the_screen_was_shown_of_an_escape_that_did_not_complete_is_not_shown_twice() -> None:
    """A held run ending in what looks like the start of an escape sequence ("ESC [4"), shown after a
    pause; the sequence never completes, so its digit begins the next run."""
    sm = StreamMasker(MASKER)
    screen = [sm.screen(sm.feed("4111111111111111\x1b[4")), sm.peek()]
    for chunk in ("111 1111 1111 1111", "\r\n"):
        screen.append(sm.screen(sm.feed(chunk)))
    screen.append(sm.screen(sm.flush()))
    assert "".join(screen) == "411111******1111\x1b[4111 11** **** 1111\r\n"

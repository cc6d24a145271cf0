"""Keys go to a terminal recording only as far as the terminal echoed them: a password typed at a prompt
that does not echo never does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pcigate.echogate import MAX_PENDING, NOT_ECHOED, EchoGate


def _session(steps: list[tuple[str, str, float]]) -> list[tuple[str, str]]:
    gate, events = EchoGate(wait=1.0), []
    for kind, text, now in steps:
        events += gate.typed(text, now) if kind == "key" else gate.shown(text, now)
    return events + gate.flush()


def test_keys_a_shell_echoes_are_recorded() -> None:
    steps = [("key", ch, 0.1 * i) for i, ch in enumerate("ls")]
    steps = [s for pair in zip(steps, [("out", "l", 0.05), ("out", "s", 0.15)], strict=True) for s in pair]
    events = _session([*steps, ("key", "\r", 0.3), ("out", "\r\nfile\r\n$ ", 0.35)])
    assert "".join(d for c, d in events if c == "i") == "ls\r"
    assert ("m", NOT_ECHOED) not in events


def test_a_password_at_a_prompt_that_does_not_echo_is_not_recorded() -> None:
    steps = [("out", "[sudo] password for alice: ", 0.0)]
    steps += [("key", ch, 0.1 + 0.1 * i) for i, ch in enumerate("hunter2")]
    steps += [("key", "\r", 1.0), ("out", "\r\nSorry, try again.\r\n[sudo] password for alice: ", 1.2)]
    events = _session(steps)
    recorded = "".join(d for _, d in events)
    for ch in "hunter2":
        assert ch not in "".join(d for c, d in events if c == "i")
    assert "hunter" not in recorded
    assert events == [("m", NOT_ECHOED), ("i", "\r")]


def test_the_enter_that_ends_a_password_is_recorded() -> None:
    """A digit run is held by the keys' masker until the next key: "2" and Enter arrive as one text."""
    events = _session([("key", "hunter", 0.0), ("key", "2\r", 0.2), ("out", "\r\n$ ", 0.3)])
    assert events == [("m", NOT_ECHOED), ("i", "\r")]


def test_a_password_without_any_output_is_not_recorded() -> None:
    assert _session([("key", "s3cret", 0.0), ("key", "\r", 0.1)]) == [("m", NOT_ECHOED), ("i", "\r")]
    gate = EchoGate(wait=1.0)
    assert gate.typed("s3cret", 0.0) == []
    assert gate.expire(0.5) == []
    assert gate.expire(1.0) == [("m", NOT_ECHOED)]  # no output within a second


def test_a_paste_echoed_in_pieces_is_recorded() -> None:
    events = _session([("key", "echo hi\r", 0.0), ("out", "echo", 0.01), ("out", " hi\r\nhi\r\n", 0.02)])
    assert events == [("i", "echo hi\r")]


def test_an_echo_with_colours_and_a_redraw_after_it() -> None:
    """Inserting in the middle of a line: the editor echoes the key, redraws the rest and moves back."""
    events = _session([("key", "x", 0.0), ("out", "\x1b[1mx\x1b[0mrest\x08\x08\x08\x08", 0.01),
                       ("key", "y", 0.1), ("out", "yrest\x08\x08\x08\x08", 0.11)])
    assert events == [("i", "x"), ("i", "y")]


def test_arrow_keys_and_enter_are_recorded_in_turn() -> None:
    events = _session([("key", "\x1b[A", 0.0), ("out", "\x1b[2Kls", 0.01), ("key", "\r", 0.1),
                       ("out", "\r\n", 0.11)])
    assert events == [("i", "\x1b[A"), ("i", "\r")]


def test_keys_typed_ahead_of_a_prompt_are_recorded_when_echoed_after_it() -> None:
    events = _session([("key", "ab", 0.0), ("out", "build output\r\n", 0.01), ("out", "$ ab", 0.2)])
    assert events == [("i", "ab")]
    events = _session([("key", "ab", 0.0), ("out", "build output\r\n$ ab", 0.01), ("key", "c", 0.3),
                       ("out", "c", 0.31)])
    assert events == [("i", "ab"), ("i", "c")]


def test_keys_never_echoed_become_a_marker_after_a_second() -> None:
    """vi's normal mode: the keys are not echoed, the screen is redrawn."""
    events = _session([("key", "d", 0.0), ("out", "\x1b[2;1Hline two", 0.01), ("key", "d", 0.1),
                       ("out", "\x1b[2;1Hline three", 0.11), ("key", "x", 1.5), ("out", "\x1b[1;1H", 1.51)])
    assert events == [("m", NOT_ECHOED)]


def test_pending_keys_are_capped() -> None:
    gate = EchoGate(wait=60.0)
    events = gate.typed("k" * (MAX_PENDING + 1), 0.0)
    assert events == [("m", NOT_ECHOED)]


@given(st.text(alphabet="abc123 \r\x7f", max_size=30), st.text(alphabet="abc123 \r\n$:", max_size=30))
def test_recorded_keys_are_in_the_output(keys: str, out: str) -> None:
    gate = EchoGate(wait=1.0)
    events = [*(e for ch in keys for e in gate.typed(ch, 0.0)), *gate.shown(out, 0.01), *gate.flush()]
    recorded = "".join(d for c, d in events if c == "i")
    assert "".join(ch for ch in recorded if ch.isprintable()) in out


@given(st.text(alphabet="abcxyz123!", min_size=1, max_size=20), st.text(alphabet="abc123 :$[]", max_size=40),
       st.floats(min_value=0.0, max_value=5.0))
def test_a_line_the_output_does_not_echo_is_never_recorded(secret: str, reply: str, delay: float) -> None:
    """Typed key by key or pasted, then Enter; what comes back starts with a line break (a password
    prompt's reply): none of it is recorded, whatever the reply and however late."""
    for pieces in (list(secret), [secret]):
        gate = EchoGate(wait=1.0)
        events = [e for i, p in enumerate(pieces) for e in gate.typed(p, 0.01 * i)]
        events += gate.typed("\r", 0.3) + gate.shown("\r\n" + reply + "\r\n$ ", 0.3 + delay) + gate.flush()
        assert "".join(d for c, d in events if c == "i") == "\r"
        assert ("m", NOT_ECHOED) in events

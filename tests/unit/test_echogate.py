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


def test_an_echo_with_colours_is_recorded_but_one_with_a_redraw_after_it_is_not() -> None:
    """Inserting in the middle of a line: the editor echoes the key, redraws the rest and moves back; the
    output is more than the echo, so the key is not taken for echoed (lossy towards safety)."""
    assert _session([("key", "x", 0.0), ("out", "\x1b[1mx\x1b[0m", 0.01)]) == [("i", "x")]
    events = _session([("key", "x", 0.0), ("out", "xrest\x08\x08\x08\x08", 0.01)])
    assert events == [("m", NOT_ECHOED)]


def test_arrow_keys_and_enter_are_recorded_in_turn() -> None:
    events = _session([("key", "\x1b[A", 0.0), ("out", "\x1b[2Kls", 0.01), ("key", "\r", 0.1),
                       ("out", "\r\n", 0.11)])
    assert events == [("i", "\x1b[A"), ("i", "\r")]


def test_keys_typed_ahead_of_a_prompt_become_a_marker() -> None:
    events = _session([("key", "ab", 0.0), ("out", "build output\r\n$ ", 0.01), ("key", "c", 0.3),
                       ("out", "c", 0.31)])
    assert events == [("m", NOT_ECHOED), ("i", "c")]


def test_a_password_typed_ahead_of_its_prompt_is_not_recorded() -> None:
    """su: the keys reach the server after it turned echo off; the prompt that arrives next begins like the
    password (found in review on a real su: "Passw" was recorded)."""
    steps = [("key", ch, 0.01 * i) for i, ch in enumerate("Passw0rd\r")]
    events = _session([*steps, ("out", "Password: ", 0.2), ("out", "\r\n# ", 0.3)])
    assert "".join(d for c, d in events if c == "i") == "\r"


def test_a_password_followed_by_a_prompt_that_begins_like_it_is_not_recorded() -> None:
    """read -rs PW and no echo after it: the next output is the prompt (found in review: "alice")."""
    steps = [("key", ch, 0.01 * i) for i, ch in enumerate("alice2024\r")]
    events = _session([*steps, ("out", "alice@web1:~$ ", 0.2)])
    assert "".join(d for c, d in events if c == "i") == "\r"


def test_output_during_a_prompt_that_does_not_echo_records_no_key() -> None:
    gate = EchoGate(wait=1.0)
    events = gate.shown("Password: ", 0.0) + gate.typed("s", 0.1) + gate.shown("status: ok\r\n", 0.15)
    events += gate.typed("3", 0.2) + gate.typed("cret\r", 0.3) + gate.shown("\r\n", 0.35) + gate.flush()
    assert events == [("m", NOT_ECHOED), ("i", "\r")]


def test_a_typo_fixed_with_backspace_while_echoes_are_on_the_way() -> None:
    """Typed ahead of the echo (100 ms away): Backspace's echo "\\b \\b" is no text (found in review)."""
    keys = [("key", k, 0.03 * i) for i, k in enumerate(["s", "l", "\x7f", "\x7f", "l", "s", "\r"])]
    outs = [("out", o, 0.1 + 0.03 * i) for i, o in enumerate(["s", "l", "\x08 \x08", "\x08 \x08", "l", "s",
                                                                "\r\nfile\r\n$ "])]
    events = _session(sorted([*keys, *outs], key=lambda e: e[2]))
    assert "".join(d for c, d in events if c == "i") == "sl\x7f\x7fls\r"


def test_escape_or_alt_at_a_silent_prompt_lets_no_character_in() -> None:
    """The keys' masker holds a bare ESC and releases it with the next key: "\\x1bh" is Escape then h, not a
    key without text (found in review, with a real bash read -rs)."""
    for first in ("\x1bh", "\x1b(h", "\x1b]h", "\x1b[h"):
        events = _session([("key", first, 0.0), ("key", "unter2\r", 0.1), ("out", "\r\n$ ", 0.2)])
        assert "h" not in "".join(d for c, d in events if c == "i"), first
    assert _session([("key", "\x1b[1;5C", 0.0), ("key", "\x1b[200~ls\x1b[201~", 0.1), ("out", "ls", 0.11)]) \
        == [("i", "\x1b[1;5C"), ("i", "\x1b[200~ls\x1b[201~")]


def test_application_cursor_keys_are_control_keys() -> None:
    events = _session([("key", "\x1bOA", 0.0), ("key", "x", 0.1), ("out", "x", 0.11)])
    assert events == [("i", "\x1bOA"), ("i", "x")]


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

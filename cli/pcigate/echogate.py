"""Typed input for a terminal recording, only as far as the terminal echoed it (pure: text and times in,
recording events out).

An interactive session's keystrokes are worth recording (what was typed, with the output it caused), except
what is typed at a prompt that does not echo: a sudo password, a passphrase, a PIN. The CLI cannot ask the
remote terminal whether it echoes, so it judges by the output, strictly: keys are recorded only when the
next output is their echo and nothing else (a shell's line editor echoes each key on its own), allowing
control characters after it, and after an Enter among them a line break and the command's output. Output
that is anything else (a prompt, a status line, ``\\r\\n`` after a password, or an echo with a redraw after
it), or no output within :attr:`EchoGate.wait` seconds, means the keys waiting were not echoed: the
recording gets a marker (``m``, :data:`NOT_ECHOED`) instead of them, one marker for a run of such keys, and
their line ends. Control keys (Enter, Backspace, arrows, Ctrl-C) carry no text of their own and are recorded
in turn.

Lossy on purpose, towards safety: keys typed ahead of a prompt, inserted in the middle of a line (the
editor redraws the rest), completed with Tab in the same output, pasted over several lines, or not echoed by
a full-screen program (vi's normal mode) become markers; the output shows what they did. A secret would be
recorded only if the output that followed were exactly its text (and a line break, had Enter been typed
with it in one read).

Input is the masked text the keystrokes' StreamMasker released (card data is masked before it gets here);
output is the masked text released for the recording.
"""

from __future__ import annotations

import re
from collections import deque

NOT_ECHOED = "input not echoed"
# escape sequences: CSI, SS3 (application cursor keys: ESC O A), designations, OSC (to BEL or ST), and the
# two-character ones (ESC =, ESC 7, ...)
_SEQ = re.compile(
    r"\x1b(?:\[[0-?]*[ -/]*[@-~]|O[ -~]|[()*+][0-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ERASE = re.compile(r"\x08 \x08")  # the echo of Backspace: back, a blank, back (no text of its own)
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]")
MAX_PENDING = 4096  # characters of keys waiting for their echo at most; more are judged not echoed


# What a terminal sends for a key that has no text: CSI with a key's final (arrows, Home/End, F-keys, Delete,
# bracketed paste's markers) and SS3 (application cursor keys). Nothing else: an ESC the keys' masker held
# and released with the next key ("\x1bh": Escape, then h) or Alt+x leaves that character as text that
# must be echoed to be recorded (found in review: Escape at a password prompt let the next character in).
_KEY_SEQ = re.compile(r"\x1b(?:\[[0-9;]*[A-DEFHPQRSZ~u]|O[A-DEFHPQRS])")


def _key_text(text: str) -> str:
    """What a key's echo looks like: its printable characters (an arrow key or Enter has none)."""
    return _CONTROL.sub("", _KEY_SEQ.sub("", text))


def _ends_line(keys: str) -> bool:
    return "\r" in keys or "\n" in keys


class EchoGate:
    """Feed it the keys (:meth:`typed`) and the output (:meth:`shown`) as they happen; each call returns the
    recording events ``(code, data)`` due now, in order."""

    __slots__ = ("_marked", "_partial", "_pending", "_size", "wait")

    def __init__(self, wait: float = 1.0) -> None:
        self.wait = wait
        self._pending: deque[tuple[float, str, str]] = deque()  # (when typed, the keys, their echo)
        self._partial = ""  # output so far that is the start of the first pending key's echo
        self._marked = False  # the last event was a marker (a run of keys not echoed makes one)
        self._size = 0

    def typed(self, text: str, now: float) -> list[tuple[str, str]]:
        events = self.expire(now)
        if not text:
            return events
        key = _key_text(text)
        if not key and not self._pending:
            self._emit(events, "i", text)
            return events
        self._pending.append((now, text, key))
        self._size += len(key)
        while self._size > MAX_PENDING:
            self._drop(events)
        return events

    def shown(self, text: str, now: float) -> list[tuple[str, str]]:
        """Output went to the recording: the keys it is the echo of are recorded, the others waiting
        before it are not."""
        events = self.expire(now)
        if not self._pending:
            return events
        seen = self._partial + _ERASE.sub("\x08", _SEQ.sub("", text))
        self._partial = ""
        pos = count = 0
        enter = False
        for _, keys, key in self._pending:
            if key and not seen.startswith(key, pos):
                tail = seen[pos:]
                if tail and key.startswith(tail):  # the start of its echo: the rest may follow
                    self._partial = tail
                    pos = len(seen)
                break
            pos += len(key)
            count += 1
            enter = enter or _ends_line(keys)
        rest = seen[pos:]
        printable = _PRINTABLE.search(rest) is not None
        if printable and not (count and enter and rest[0] in "\r\n"):
            self._drop_waiting(events)  # output that is not (only) their echo: none of them was echoed
            return events
        for _ in range(count):
            self._emit(events, "i", self._pop())
        if printable:  # a line's output after its echo: keys still waiting were typed before it
            self._drop_waiting(events)
        return events

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Keys without output for :attr:`wait` seconds are judged not echoed."""
        events: list[tuple[str, str]] = []
        while self._pending and (not self._pending[0][2] or now - self._pending[0][0] >= self.wait):
            if not self._pending[0][2]:
                self._emit(events, "i", self._pop())
            else:
                self._drop(events)
        if not self._pending:
            self._partial = ""
        return events

    def flush(self) -> list[tuple[str, str]]:
        """The end of the session: what still waits was not echoed (control keys are recorded)."""
        events: list[tuple[str, str]] = []
        self._drop_waiting(events)
        return events

    def _drop_waiting(self, events: list[tuple[str, str]]) -> None:
        self._partial = ""
        while self._pending:
            if self._pending[0][2]:
                self._drop(events)
            else:
                self._emit(events, "i", self._pop())

    def _pop(self) -> str:
        _, keys, key = self._pending.popleft()
        self._size -= len(key)
        return keys

    def _drop(self, events: list[tuple[str, str]]) -> None:
        keys = self._pop()
        self._partial = ""
        if not self._marked:
            events.append(("m", NOT_ECHOED))
            self._marked = True
        if ends := "".join(ch for ch in keys if ch in "\r\n"):  # the Enter read with a held digit ("2\r")
            self._emit(events, "i", ends)

    def _emit(self, events: list[tuple[str, str]], code: str, data: str) -> None:
        if events and events[-1][0] == code == "i":
            events[-1] = ("i", events[-1][1] + data)
        else:
            events.append((code, data))
        self._marked = False

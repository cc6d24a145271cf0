"""Typed input for a terminal recording, only as far as the terminal echoed it (pure: text and times in,
recording events out).

An interactive session's keystrokes are worth recording (what was typed, with the output it caused), except
what is typed at a prompt that does not echo: a sudo password, a passphrase, a PIN. The CLI cannot ask the
remote terminal whether it echoes, so it judges by the output: a keystroke (or a paste) is recorded when the
next output begins with it, as a shell's line editor echoes each key; when output that is not its echo comes
first (``\\r\\n`` and a prompt after a password), or no output within :attr:`EchoGate.wait` seconds, the
recording gets a marker (``m``, :data:`NOT_ECHOED`) instead of the keys, one marker for a run of such keys.
Control keys (Enter, Backspace, arrows, Ctrl-C) carry no text of their own and are recorded in turn.

Lossy on purpose, and towards safety: keys typed ahead of a busy program's output, or commands a full-screen
program does not echo (vi's normal mode), become markers too; the output shows what they did. A password
whose first characters happen to be what the program prints next would have those characters recorded:
after a password the output starts with a line break, which no key's text does.

Input is the masked text the keystrokes' StreamMasker released (card data is masked before it gets here);
output is the masked text released for the recording.
"""

from __future__ import annotations

import re
from collections import deque

NOT_ECHOED = "input not echoed"
# escape sequences: CSI, designations, OSC (to BEL or ST), and two-character ones (ESC =, ESC 7, ...)
_SEQ = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()*+][0-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -~])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PENDING = 4096  # characters of keys waiting for their echo at most; more are judged not echoed


def _key_text(text: str) -> str:
    """What a key's echo looks like: its printable characters (an arrow key or Enter has none)."""
    return _CONTROL.sub("", _SEQ.sub("", text))


def _ends_line(keys: str) -> bool:
    return "\r" in keys or "\n" in keys


class EchoGate:
    """Feed it the keys (:meth:`typed`) and the output (:meth:`shown`) as they happen; each call returns the
    recording events ``(code, data)`` due now, in order."""

    __slots__ = ("_enters", "_marked", "_partial", "_pending", "_size", "wait")

    def __init__(self, wait: float = 1.0) -> None:
        self.wait = wait
        self._pending: deque[tuple[float, str, str]] = deque()  # (when typed, the keys, their echo)
        self._partial = ""  # output so far that is the start of the first pending key's echo
        self._marked = False  # the last event was a marker (a run of keys not echoed makes one)
        self._size = 0
        self._enters = 0  # pending keys that end a line (Enter): after one, output must be the echo

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
        self._enters += _ends_line(text)
        while self._size > MAX_PENDING:
            self._drop(events)
        return events

    def shown(self, text: str, now: float) -> list[tuple[str, str]]:
        """Output went to the recording: keys whose echo it begins with are recorded."""
        events = self.expire(now)
        if not self._pending:
            return events
        seen = self._partial + _SEQ.sub("", text)
        self._partial = ""
        matched = False
        while self._pending:
            key = self._pending[0][2]
            if not key:  # a control key: in turn
                self._emit(events, "i", self._pop())
                continue
            if seen.startswith(key):
                self._emit(events, "i", self._pop())
                seen = seen[len(key) :]
                matched = True
                continue
            if key.startswith(seen):  # its echo so far (or nothing left of this output): wait for more
                self._partial = seen
                break
            if matched:  # the rest of an echo (a line editor redrawing the line after the cursor)
                break
            if key.strip() and seen.endswith(key):  # typed ahead: the prompt came first, then the echo
                self._emit(events, "i", self._pop())
                break
            if not self._enters:  # output of its own (a prompt printed after the key was typed): wait
                break
            self._drop(events)  # the line was ended, and what came back does not begin with the key
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
        while self._pending:
            if self._pending[0][2]:
                self._drop(events)
            else:
                self._emit(events, "i", self._pop())
        self._partial = ""
        return events

    def _pop(self) -> str:
        _, keys, key = self._pending.popleft()
        self._size -= len(key)
        self._enters -= _ends_line(keys)
        return keys

    def _drop(self, events: list[tuple[str, str]]) -> None:
        keys = self._pop()
        self._partial = ""
        if not self._marked:
            events.append(("m", NOT_ECHOED))
            self._marked = True
        if controls := "".join(_CONTROL.findall(keys)):  # the Enter read with a held digit ("2\r")
            self._emit(events, "i", controls)

    def _emit(self, events: list[tuple[str, str]], code: str, data: str) -> None:
        if events and events[-1][0] == code == "i":
            events[-1] = ("i", events[-1][1] + data)
        else:
            events.append((code, data))
        self._marked = False

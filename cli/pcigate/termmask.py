"""Card-data masking for a terminal stream (pure: text in, text out).

A terminal session arrives in pieces of any size: a card number can be split between two reads, or typed
one digit at a time and echoed back digit by digit. :class:`StreamMasker` masks the stream as if it were one
text: a PAN can only span characters of the run class (digits, space, dash), so it passes on everything up
to the last character outside that class and holds back a trailing run until the next piece shows where it
ends. ``flush()`` masks and releases what is held (the end of the stream).

One masker serves the screen and the recording: what ``feed`` releases goes to both. A person typing a number
must see it, though, so after a short pause the screen is shown the held run (masked as far as it can be
judged so far) with :meth:`peek`, while the recording waits for the run to end: a number typed or printed
piecemeal is never recorded in clear. The screen then gets only the rest of the run when it is released
(:meth:`screen`).

Programs colour what they print: ``grep --color`` wraps the match in escape sequences, so a card number can
reach the terminal as ``4111\x1b[01;31m\x1b[K1111\x1b[m\x1b[K11111111``. Control sequences (CSI: ``ESC [``
parameters, a final byte) and character-set designations (``ESC ( B``, which ``tput sgr0`` emits) are
therefore invisible to the masking: :func:`mask_terminal` masks the text as it shows on the screen (the
sequences taken out), puts the sequences back where they were, and a held run may contain them (and end in
one not yet complete). Other escape sequences (OSC titles and hyperlinks, SI/SO) count as ordinary
characters.

Bytes become text with an incremental UTF-8 decoder (a character split between reads is kept whole;
invalid bytes become U+FFFD), so the recording holds valid asciicast text.
"""

from __future__ import annotations

import codecs
import re

from pcigate.masking import Masker

RUN_CHARS = frozenset("0123456789 -")
MAX_HOLD = 4096  # characters held back at most; a longer run is masked as it stands and passed on
# a complete control sequence (ECMA-48 CSI) or character-set designation; one not complete yet, at the end
_CSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()*+][0-~])")
_CSI_TAIL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|[()*+])?\Z")


def mask_terminal(masker: Masker, text: str) -> str:
    """``text`` masked as the screen shows it: card data is looked for in the text without its control
    sequences, which stay where they were, and in the text as it is (where a sequence separates two numbers
    that the screen shows run together); what either finds is masked. Same length and sequences in, unless
    anything went wrong with the lengths: then the visible text with all either way finds masked (the
    colours go, the card data too)."""
    plain = masker.mask_text(text)  # sequences break runs here (two numbers with a colour between)
    if "\x1b" not in text:
        return plain
    visible = _CSI.sub("", text)
    masked = masker.mask_text(visible)
    if masked == visible:  # the common case (coloured output, no card number in it): no mapping needed
        return plain
    spans = [m.span() for m in _CSI.finditer(text)]
    parts: list[str] = []
    pos = 0
    for a, b in spans:
        parts.append(text[pos:a])
        pos = b
    parts.append(text[pos:])
    if len(masked) != len(visible) or len(plain) != len(text):  # not expected: mask_text keeps lengths
        return masker.mask_text(_CSI.sub("", plain))  # fail closed
    out: list[str] = []
    k = 0
    for part, (a, b) in zip(parts, [*spans, (0, 0)], strict=True):
        out.append(masked[k : k + len(part)])
        k += len(part)
        out.append(text[a:b])
    joined = "".join(out)
    if plain == text:
        return joined
    # both ways: a character either masking changed stays changed
    return "".join(p if p != t else j for t, p, j in zip(text, plain, joined, strict=True))


def _run_start(text: str) -> int:
    """Where the trailing run begins: the run characters, complete control sequences among them, and a
    control sequence still incomplete at the very end."""
    esc = text.rfind("\x1b")  # an incomplete sequence can only start at the last ESC
    cut = esc if esc >= 0 and _CSI_TAIL.match(text, esc) else len(text)
    while cut > 0:
        if text[cut - 1] in RUN_CHARS:
            cut -= 1
            continue
        esc = text.rfind("\x1b", 0, cut)
        if esc >= 0 and _CSI.fullmatch(text, esc, cut):
            cut = esc
            continue
        break
    return cut


class StreamMasker:
    __slots__ = ("_decoder", "_held", "_masker", "_shown", "max_hold")

    def __init__(self, masker: Masker | None, *, max_hold: int = MAX_HOLD) -> None:
        self._masker = masker
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self._shown = 0  # characters of the held run the screen was already shown (peek)
        self.max_hold = max_hold

    @property
    def pending(self) -> bool:
        """True while text is held back (the screen side flushes it after a short pause)."""
        return bool(self._held)

    def feed_bytes(self, data: bytes) -> str:
        return self.feed(self._decoder.decode(data))

    def feed(self, text: str) -> str:
        """The masked text that is safe to pass on now (possibly empty)."""
        if self._masker is None:
            return text
        text = self._held + text
        cut = _run_start(text)
        held = text[cut:]
        if "\x1b" in held:
            held = _CSI.sub("", held)  # digits in complete sequences are no reason to hold
        if len(text) - cut > self.max_hold or not any(c.isdigit() for c in held):
            cut = len(text)
        self._held = text[cut:]
        return mask_terminal(self._masker, text[:cut]) if cut else ""

    def flush(self) -> str:
        """Mask and release everything held back (and a character the decoder still holds)."""
        tail = self._decoder.decode(b"", final=True)
        if self._masker is None:
            return tail
        text, self._held = self._held + tail, ""
        return mask_terminal(self._masker, text) if text else ""

    def screen(self, released: str) -> str:
        """The part of ``released`` (what ``feed``/``flush`` just returned) the screen has not been shown."""
        if not released or not self._shown:
            return released
        if len(released) < self._shown:
            # the held run ended inside what was shown (an escape sequence that did not complete: its
            # digits start the next run), so the rest of what was shown is the start of the new held run
            self._shown -= len(released)
            return ""
        # a release always starts with the whole held run (it ends at a later character), so what was shown
        # of it is behind us now
        part, self._shown = released[self._shown :], 0
        return part

    def peek(self) -> str:
        """For the screen after a pause: the held run, masked as far as it can be judged now, that the screen
        has not been shown yet. It stays held for the recording."""
        if not self._held or self._masker is None:
            return ""
        part = mask_terminal(self._masker, self._held)[self._shown :]
        self._shown = len(self._held)
        return part

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

Bytes become text with an incremental UTF-8 decoder (a character split between reads is kept whole;
invalid bytes become U+FFFD), so the recording holds valid asciicast text.
"""

from __future__ import annotations

import codecs

from pcigate.masking import Masker

RUN_CHARS = frozenset("0123456789 -")
MAX_HOLD = 4096  # characters held back at most; a longer run is masked as it stands and passed on


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
        cut = len(text)
        while cut > 0 and text[cut - 1] in RUN_CHARS:
            cut -= 1
        if len(text) - cut > self.max_hold or not any(c.isdigit() for c in text[cut:]):
            cut = len(text)
        self._held = text[cut:]
        return self._masker.mask_text(text[:cut]) if cut else ""

    def flush(self) -> str:
        """Mask and release everything held back (and a character the decoder still holds)."""
        tail = self._decoder.decode(b"", final=True)
        if self._masker is None:
            return tail
        text, self._held = self._held + tail, ""
        return self._masker.mask_text(text) if text else ""

    def screen(self, released: str) -> str:
        """The part of ``released`` (what ``feed``/``flush`` just returned) the screen has not been shown."""
        if not released or not self._shown:
            return released
        # a release always starts with the whole held run (it ends at a later character), so what was shown
        # of it is behind us now
        part, self._shown = released[self._shown :], 0
        return part

    def peek(self) -> str:
        """For the screen after a pause: the held run, masked as far as it can be judged now, that the screen
        has not been shown yet. It stays held for the recording."""
        if not self._held or self._masker is None:
            return ""
        part = self._masker.mask_text(self._held)[self._shown :]
        self._shown = len(self._held)
        return part

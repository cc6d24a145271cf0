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

import bisect
import codecs
import re

from pcigate.masking import _TRACK1 as _TRACK1_BYTES
from pcigate.masking import _TRACK2 as _TRACK2_BYTES
from pcigate.masking import Masker, luhn_ok

RUN_CHARS = frozenset("0123456789 -")
MAX_HOLD = 4096  # characters held back at most; a longer run is masked as it stands and passed on
# a complete control sequence (ECMA-48 CSI) or character-set designation; one not complete yet, at the end
_CSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[()*+][0-~])")
_DESIG_DIGIT = re.compile(r"\x1b[()*+][0-9]")
_CSI_TAIL = re.compile(r"\x1b(?:\[[0-?]*[ -/]*|[()*+])?\Z")


def mask_terminal(masker: Masker, text: str) -> str:
    """``text`` masked as the screen shows it: card data is looked for in the text without its control
    sequences, which stay where they were, and in the text as it is (where a sequence separates two numbers
    that the screen shows run together); what either finds is masked. Same length and sequences in, unless
    anything went wrong with the lengths: then the visible text with all either way finds masked (the
    colours go, the card data too)."""
    if "\x1b" not in text:
        return masker.mask_text(text)
    plain = _mask_raw(masker, text)  # sequences break runs here (two numbers with a colour between)
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


# The start of track data that may not be complete yet, at the end of the text: a prefix of what masking.py's
# _TRACK1 / _TRACK2 match (sentinels optional), up to a maximal match's end (its tail still growing), a lone
# start sentinel or format code included. A superset: holding a little more than needed only delays it.
_TRACK_TAIL = re.compile(
    r"(?:%?B(?:[0-9][0-9 ]{0,22}(?:\^[^^\x00\r\n]{0,26}(?:\^[0-9A-Za-z]{0,64}\??)?)?)?"
    r"|%"
    r"|;?[0-9]{1,19}=[0-9]{0,44}\??"
    r"|;[0-9]{0,19})\Z"
)
# Whole tracks: masking.py's own patterns, on characters here (a name of up to 26 characters is at least as
# many bytes, so these match at least where masking does).
_TRACK1 = re.compile(_TRACK1_BYTES.pattern.decode("ascii"))
_TRACK2 = re.compile(_TRACK2_BYTES.pattern.decode("ascii"))
# The start of a track once its PAN and field separator are there.
_TRACK_HEAD = re.compile(r"%?B([0-9][0-9 ]{11,21}[0-9])\^|;?([0-9]{13,19})=")
_TRACK_TAIL_MAX = 120  # longer than any text _TRACK_TAIL matches
_TRACK_SPAN = 128  # longer than any whole track: looked at around a cut for one it would split


class _Shown:
    """``text`` from ``lo`` on as the screen shows it (complete control sequences taken out), with the way
    between positions in it and in ``text``."""

    __slots__ = ("lo", "raw", "text", "vis")

    def __init__(self, text: str, lo: int, *, hide: bool = True) -> None:
        esc = text.rfind("\x1b", max(0, lo - 64), lo)  # not from inside a sequence
        if esc >= 0 and (m := _CSI.match(text, esc)) is not None and m.end() > lo:
            lo = esc
        self.lo = lo
        self.vis: list[int] = []  # where each piece between sequences starts, here and in ``text``
        self.raw: list[int] = []
        parts: list[str] = []
        v, r = 0, lo
        if hide and text.find("\x1b", lo) >= 0:
            for m in _CSI.finditer(text, lo):
                if m.start() > r:
                    self.vis.append(v)
                    self.raw.append(r)
                    parts.append(text[r : m.start()])
                    v += m.start() - r
                r = m.end()
        stop = len(text)  # a sequence not complete yet at the end is not shown either
        esc = text.rfind("\x1b", r) if hide else -1
        if esc >= 0 and _CSI_TAIL.match(text, esc):
            stop = esc
        if r < stop:
            self.vis.append(v)
            self.raw.append(r)
            parts.append(text[r:stop])
        self.text = "".join(parts)

    def shown(self, i: int) -> int:
        """The number of shown characters before ``text[i]`` (``i`` ≥ ``lo``)."""
        k = bisect.bisect_right(self.raw, i) - 1
        if k < 0:
            return 0
        end = self.vis[k + 1] if k + 1 < len(self.vis) else len(self.text)
        return min(self.vis[k] + i - self.raw[k], end)

    def back(self, v: int) -> int:
        """Where shown character ``v`` starts in ``text``, the sequences just before it included."""
        if v == 0:
            return self.lo
        k = bisect.bisect_right(self.vis, v - 1) - 1
        return self.raw[k] + v - self.vis[k]


def _tail_start(text: str, lo: int = 0) -> int | None:
    """Where track data that may still be growing at the end of ``text`` begins (None: there is none)."""
    lo = max(lo, len(text) - _TRACK_TAIL_MAX)
    # where such a tail can start: a sentinel, format code B, or the digits before a track 2's "=" (trying
    # these few places is ~10x faster than a regular-expression search through the whole tail)
    starts: list[int] = []
    for ch in "%B;=":
        i = text.find(ch, lo)
        while i >= 0:
            if ch == "=":
                j = i
                while j > lo and i - j < 19 and text[j - 1].isdigit():
                    j -= 1
                starts.append(j)
            else:
                starts.append(i)
            i = text.find(ch, i + 1)
    for i in sorted(starts):
        if _TRACK_TAIL.match(text, i):
            return i
    return None


def _track_start(text: str, cut: int) -> int:
    """Where to cut ``text`` (at most at ``cut``) so that track data that may still be growing at the end is
    held back, and the cut splits neither a whole track (the digits at the end of a track 1) nor a digit run
    (a track 2 without its sentinel). Judged on the text as the screen shows it (a colour change inside a
    track does not end it), in a window of a few hundred characters before the cut and the end, so one read
    costs the same however long the held run is. With control sequences in the window, also as the raw text
    reads (a sequence between two tracks, or one that swallows a track's digits as its parameters), as the
    masking of the whole does."""
    lo = max(0, min(cut, len(text) - _TRACK_TAIL_MAX) - 2 * _TRACK_SPAN)
    if text.find("\x1b", lo) < 0:
        return _track_cut(text, cut, _Shown(text, lo, hide=False))
    shown, raw = _Shown(text, lo), _Shown(text, lo, hide=False)
    while True:  # until neither view moves the cut
        new = min(_track_cut(text, cut, shown), _track_cut(text, cut, raw))
        esc = text.rfind("\x1b", max(0, new - 64), new)  # never inside a sequence
        if esc >= 0 and (m := _CSI.match(text, esc)) is not None and m.end() > new:
            new = esc
        if new == cut:
            return cut
        cut = new


def _track_cut(text: str, cut: int, view: _Shown) -> int:
    vis, vcut = view.text, view.shown(cut)
    start = vcut
    if (t := _tail_start(vis)) is not None:
        vcut = min(vcut, t)
    while vcut < len(vis):
        was = vcut
        base, end = max(0, vcut - _TRACK_SPAN), min(len(vis), vcut + _TRACK_SPAN)
        for rx, mark in ((_TRACK1, "^"), (_TRACK2, "=")):
            if vis.find(mark, base, end) < 0:
                continue
            pos = base
            while (m := rx.search(vis, pos, end)) is not None and m.start() < vcut:  # overlapping ones too
                if vcut < m.end():
                    vcut = m.start()
                    break
                pos = m.start() + 1
        if vis[vcut] in RUN_CHARS:
            vcut = _run_start(vis[:vcut])
        if vcut == was:
            break
    if vcut >= start:
        return cut
    raw = view.back(vcut)
    if vis[vcut] in RUN_CHARS:  # a run that began before the window
        raw = _run_start(text[:raw])
    return min(raw, cut)


def _mask_raw(masker: Masker, text: str) -> str:
    """``text`` masked as it is, except that a designation's final byte (ESC ( 0 selects line drawing) is
    no digit of a number."""
    marks = list(_DESIG_DIGIT.finditer(text))
    if not marks:
        return masker.mask_text(text)
    plain = masker.mask_text(_DESIG_DIGIT.sub(lambda m: m[0][:2] + "\x00", text))  # masking keeps NUL
    parts: list[str] = []
    pos = 0
    for m in marks:
        parts += (plain[pos : m.end() - 1], text[m.end() - 1])
        pos = m.end()
    parts.append(plain[pos:])
    return "".join(parts)


def _star_track_head(held: str, masked: str) -> str:
    """``masked`` (``held`` masked) with a track still growing at its end starred from where it starts, once
    its PAN and field separator have arrived: the screen is not shown a name or expiry date before the track
    ends (when the track's own rule masks it whole). Found as the screen shows ``held`` or as it reads."""
    views = [_Shown(held, 0, hide=False)]
    if "\x1b" in held:
        views.append(_Shown(held, 0))
    first = len(held)
    for view in views:
        vis, pos = view.text, 0
        while (m := _TRACK_HEAD.search(vis, pos)) is not None:  # overlapping: 16 valid digits of 17
            digits = (m.group(1) or m.group(2)).replace(" ", "")
            if luhn_ok(digits.encode()) and _TRACK_TAIL.match(vis, m.start()):
                first = min(first, view.back(m.start()))
                break
            pos = m.start() + 1
    return masked if first == len(held) else masked[:first] + "*" * (len(held) - first)


def _run_start(text: str) -> int:
    """Where the trailing run begins: the run characters, complete control sequences among them, and a
    control sequence still incomplete at the very end."""
    esc = text.rfind("\x1b")  # an incomplete sequence can only start at the last ESC
    cut = esc if esc >= 0 and _CSI_TAIL.match(text, esc) else len(text)
    while cut > 0:
        if text[cut - 1] in RUN_CHARS:
            if cut >= 3 and _DESIG_DIGIT.match(text, cut - 3):
                cut -= 3  # a designation ending in a digit (ESC ( 0: line drawing), not part of the run
            else:
                cut -= 1
            continue
        esc = text.rfind("\x1b", 0, cut)
        if esc >= 0 and _CSI.fullmatch(text, esc, cut):
            cut = esc
            continue
        break
    return cut


class StreamMasker:
    __slots__ = ("_decoder", "_held", "_masker", "_shown", "_track", "max_hold")

    def __init__(self, masker: Masker | None, *, max_hold: int = MAX_HOLD) -> None:
        self._masker = masker
        self._track = masker is not None and masker.policy.track_data
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
        if not any(c.isdigit() for c in held):
            # nothing to hold but an escape sequence not complete yet (ESC ( may end in a digit, ESC ( 0)
            esc = text.rfind("\x1b", cut)
            cut = esc if esc >= 0 and _CSI_TAIL.match(text, esc) else len(text)
        if self._track:
            cut = _track_start(text, cut)
        if len(text) - cut > self.max_hold:
            cut = len(text)  # masked as it stands, but for track data not complete yet at the very end
            if self._track and (t := _tail_start(text)) is not None:
                cut = t
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
        shown = mask_terminal(self._masker, self._held)
        if self._track:
            shown = _star_track_head(self._held, shown)
        part = shown[self._shown :]
        self._shown = len(self._held)
        return part

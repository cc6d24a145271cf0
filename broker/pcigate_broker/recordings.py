"""Content-addressed recording files: ``<recordings_dir>/<sha256[:2]>/<sha256>``.

An upload is written to a temporary file in ``recordings_dir`` (same file system) while it is hashed and fed
to
``pcigate.recording.RecordingVerifier``; only a verified file is fsync'd and renamed into place. Nothing holds
the whole body in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class TooLarge(Exception):
    pass


@dataclass(frozen=True)
class VerifiedUpload:
    tmp_path: Path
    sha256: str
    size: int
    ok: bool
    events: int
    header: dict[str, Any] | None
    error: str | None
    line: int | None
    blocked: list[tuple[float, str, str]] = field(default_factory=list)  # (t, rule, sql) the tunnel blocked


class Upload:
    """One upload in progress: ``write(chunk)`` many times, then ``finish()``; ``discard()`` on any error."""

    def __init__(self, store: RecordingStore, max_bytes: int) -> None:
        from pcigate.recording import RecordingVerifier  # the colleague's pure verifier

        store.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".upload-", dir=store.root)
        self._file = os.fdopen(fd, "wb")
        self.path = Path(name)
        self._hash = hashlib.sha256()
        self._verifier = RecordingVerifier()
        self._size = 0
        self._max = max_bytes

    def write(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._max:
            raise TooLarge
        self._hash.update(chunk)
        self._verifier.feed(chunk)
        self._file.write(chunk)

    def finish(self) -> VerifiedUpload:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        check = self._verifier.finish()
        sha = self._hash.hexdigest()
        return VerifiedUpload(
            tmp_path=self.path,
            sha256=sha,
            size=self._size,
            ok=bool(check.ok),
            events=int(check.events),
            header=check.header if isinstance(check.header, dict) else None,
            error=check.error,
            line=check.line,
            blocked=list(check.blocked),
        )

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)


class RecordingStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path_for(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def begin(self, max_bytes: int) -> Upload:
        return Upload(self, max_bytes)

    def commit(self, upload: VerifiedUpload) -> Path:
        """Move a verified temp file to its content address (a file already there is the same bytes)."""
        dest = self.path_for(upload.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            upload.tmp_path.unlink(missing_ok=True)
            return dest
        os.chmod(upload.tmp_path, 0o440)
        os.replace(upload.tmp_path, dest)
        dir_fd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return dest

"""The broker's per-app state, built by ``create_app(settings)`` (nothing is created at import time)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from .audit import SigningKey
from .auth import TokenValidator
from .notify import Notifier
from .recordings import RecordingStore
from .settings import Settings
from .vault import Vault


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Broker:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    validator: TokenValidator
    vault: Vault
    recordings: RecordingStore
    notifier: Notifier | None = None
    audit_key: SigningKey | None = None  # signs the audit log's checkpoints (audit.signing_key_file)
    extra: dict[str, object] = field(default_factory=dict)

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.close()
        self.validator.close()
        self.engine.dispose()

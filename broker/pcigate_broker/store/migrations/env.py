"""Alembic environment: the engine is handed in by ``pcigate_broker.store.db`` (no alembic.ini)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Engine

from pcigate_broker.store.tables import Base

config = context.config
engine = config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("run migrations through pcigate_broker.store.db.upgrade(engine)")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

"""Relational state: SQLAlchemy 2 tables, the engine factory, Alembic migrations and repository functions."""

"""Alembic migrations of xpando's tables, run by ``xpando db upgrade`` (``xpando.db.migrate``)."""

"""Database tables, engine and query functions."""

from xpando.db.engine import SessionFactory, create_engine, init_db, ping, session_factory

__all__ = ["SessionFactory", "create_engine", "init_db", "ping", "session_factory"]

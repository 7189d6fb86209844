"""Deterministic orchestration only: one workflow per file."""

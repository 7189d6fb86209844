"""The xpando command's errors are messages, not tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _xpando(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XPANDO_DATA_DIR": str(tmp_path), "XPANDO_TEMPORAL_ADDRESS": "127.0.0.1:1"}
    env.pop("XPANDO_NODE_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_node_without_id_is_a_clear_error(tmp_path: Path) -> None:
    out = _xpando("worker", "node", "--region", "eu-west", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "needs an id" in out.stderr and "Traceback" not in out.stderr


def test_node_with_unknown_domain_and_no_corpus_is_a_clear_error(tmp_path: Path) -> None:
    out = _xpando("worker", "node", "--node-id", "n1", "--domain", "knitting", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "built-in domains" in out.stderr and "Traceback" not in out.stderr


def test_node_with_missing_corpus_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    out = _xpando("worker", "node", "--node-id", "n1", "--corpus", str(missing), tmp_path=tmp_path)
    assert out.returncode == 2 and str(missing) in out.stderr


def test_empty_prompt_and_bad_k_are_refused(tmp_path: Path) -> None:
    out = _xpando("task", "submit", "   ", tmp_path=tmp_path)
    assert out.returncode == 2 and "prompt is empty" in out.stderr
    out = _xpando("task", "submit", "hello", "--k", "12", tmp_path=tmp_path)
    assert out.returncode == 2 and "--k must be between 1 and 9" in out.stderr


def test_unknown_command_shows_usage(tmp_path: Path) -> None:
    out = _xpando("fly", tmp_path=tmp_path)
    assert out.returncode == 2 and "usage: xpando" in out.stderr


def test_unreachable_temporal_is_named_in_the_error(tmp_path: Path) -> None:
    out = _xpando("task", "get", "task-1", tmp_path=tmp_path)
    assert out.returncode == 2
    assert "cannot reach Temporal at 127.0.0.1:1" in out.stderr and "Traceback" not in out.stderr

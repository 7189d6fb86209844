"""The README's configuration table lists every setting there is."""

from __future__ import annotations

from pathlib import Path

from xpando.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    missing = [
        f"XPANDO_{name.upper()}"
        for name in Settings.model_fields
        if f"`XPANDO_{name.upper()}`" not in README
    ]
    assert missing == []


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "make test" in README and "make test" in ci

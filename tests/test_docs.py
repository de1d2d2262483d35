"""Docs that can drift: the generated job-file reference and the README's commands."""

from __future__ import annotations

from conftest import ROOT


def test_config_reference_is_current():
    from launcher.config_doc import render

    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == render(), (
        "docs/config.md is stale: run `python -m launcher.config_doc > docs/config.md`")


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("quickstart", "test", "test-fast", "setup"):
        assert f"make {target}" in readme and f"\n{target}:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()

"""The README tells the truth: its first two commands, its config reference, and CI's command."""

from __future__ import annotations

import re

from conftest import ROOT
from dist_lm.config.reference import embedded_reference, reference_markdown


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_first_two_commands_are_make_demo_and_make_test():
    first_block = re.search(r"```bash\n(.*?)```", readme(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands[:2] == ["make demo", "make test"]


def test_config_reference_is_generated_from_the_dataclasses():
    assert embedded_reference(readme()).strip() == reference_markdown().strip(), \
        "README's config reference is stale: python tools/config_reference.py --update README.md"


def test_every_config_field_has_a_docstring():
    for line in reference_markdown().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented field: {line}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()

"""The docs tell the truth: the README's first two commands, the config reference, CI's command,
the README's size and its links."""

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
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert embedded_reference(page).strip() == reference_markdown().strip(), (
        "docs/configuration.md's config reference is stale: "
        "python tools/config_reference.py --update docs/configuration.md"
    )


def test_every_config_field_has_a_docstring():
    for line in reference_markdown().splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented field: {line}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_front_door_and_its_links_resolve():
    """At most 15 KB, and every relative link in the README and docs/ points at a file that exists."""
    assert len(readme().encode()) <= 15_000
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_code_that_cites_a_benchmarks_section_names_one_that_exists():
    """A comment or docstring citing docs/benchmarks.md, "Section" names a heading of that page
    (it once cited "the fourth session", which three headings were called), and the page stays a
    guide of at most 300 lines."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    headings = {line.lstrip("#").strip() for line in page.splitlines() if line.startswith("#")}
    assert len(page.splitlines()) <= 300
    cited = []
    for path in [*(ROOT / "dist_lm").rglob("*.py"), *(ROOT / "tools").glob("*.py")]:
        text = re.sub(r"\n\s*#\s*", " ", path.read_text())  # a comment continued on the next line
        cited += [(path.name, " ".join(s.split())) for s in re.findall(r'benchmarks\.md,\s+"([^"]+)"', text)]
    assert cited and all(section in headings for _, section in cited), [c for c in cited if c[1] not in headings]

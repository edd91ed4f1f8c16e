"""The README and docs/ stay true: every setting documented, commands that exist, links that land."""

import re
from pathlib import Path

from contract.settings import Settings

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of every heading of `page`, outside code blocks."""
    return {anchor(h) for h in re.findall(r"^#{1,6} (.+)$", FENCED.sub("", page.read_text()), re.MULTILINE)}


def test_every_setting_is_in_the_configuration_table():
    table = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `RERANK_{name.upper()}` |" in table, f"RERANK_{name.upper()} is missing from docs/configuration.md"
    for row in re.findall(r"^\| `RERANK_\w+` \|.*$", README, re.MULTILINE):
        assert row.replace("](docs/", "](") in table, f"the README's row differs from docs/configuration.md's: {row}"


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/run" in README and "python -m pytest" in README and "\npython -m pytest" in ci


def test_the_readme_is_a_manual_not_a_notebook():
    # Given the README: short enough to read, with a table of contents that names every section
    lines = README.splitlines()
    assert len(lines) <= 360, f"the README has {len(lines)} lines: move detail to docs/"
    sections = re.findall(r"^## (.+)$", FENCED.sub("", README), re.MULTILINE)
    contents = README[README.index("## Contents") : README.index("\n## ", README.index("## Contents") + 3)]
    missing = [s for s in sections if s != "Contents" and f"(#{anchor(s)})" not in contents]
    assert not missing, f"sections missing from the README's contents: {missing}"


def test_every_link_lands_on_a_file_and_heading_that_exist():
    # Given every relative link of the README and docs/
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCED.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # a URL, not a file here
            path, _, fragment = target.partition("#")
            # Then its file exists, and its anchor is one of that file's headings
            landing = (page.parent / path).resolve() if path else page
            if not landing.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and landing.suffix == ".md" and fragment not in anchors(landing):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)

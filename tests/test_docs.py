"""The documentation holds together: relative links resolve, the README stays a short front door,
and the configuration table in docs/usage.md names exactly the settings of configs.py."""
import re
from pathlib import Path

import pytest

import configs

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 15_000

FENCED_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def prose(text):
    """Markdown text without fenced blocks and code spans, where no link is rendered."""
    return CODE_SPAN.sub("", FENCED_BLOCK.sub("", text))


def heading_anchors(text):
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces -> '-',
    repeats numbered -1, -2, ..."""
    anchors, seen = set(), {}
    for heading in HEADING.findall(FENCED_BLOCK.sub("", text)):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def broken_links(path):
    """'target (why)' for every relative link of a markdown file that does not resolve."""
    broken = []
    for target in LINK.findall(prose(path.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text(encoding="utf-8")):
            broken.append(f"{target} (no heading with this anchor)")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_link_check_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "other.md").write_text("# A title\n\n## Second `part` (here)\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#second-part-here) [ok](#local) [web](https://example.org/x)\n"
                    "`[not a link](nowhere.md)`\n```\n[not a link](nowhere.md)\n```\n"
                    "# Local\n[gone](missing.md) [bad anchor](other.md#third) ![img](pic.png)\n")
    assert broken_links(page) == ["missing.md (no such file)", "other.md#third (no heading with this anchor)",
                                  "pic.png (no such file)"]


def test_heading_anchors_follow_github():
    text = "# Configuration (`configs.py`)\n## Why: it works, mostly\n## Why: it works, mostly\n"
    assert heading_anchors(text) == {"configuration-configspy", "why-it-works-mostly", "why-it-works-mostly-1"}


def test_readme_is_short():
    assert (ROOT / "README.md").stat().st_size <= README_MAX_BYTES


def test_configuration_table_names_exactly_the_settings_of_configs_py():
    usage = (ROOT / "docs" / "usage.md").read_text(encoding="utf-8")
    section = usage[usage.index("## Configuration"):]
    first_cells = re.findall(r"^\| (.*?) \|", section, re.M)
    keys = {key for cell in first_cells for key in re.findall(r"`(\w+)`", cell)}
    assert keys == set(configs.config_settings)

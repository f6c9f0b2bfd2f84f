"""Every relative link in README.md and docs/*.md points at a file that exists and, with a #fragment, at a heading
of that file (anchors as GitHub renders them), so moving a section between pages cannot leave a dead link."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are examples, not links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, characters other than letters, digits, '_', '-' and spaces dropped,
    spaces turned into '-', a repeated id suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M).splitlines():
        heading = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def test_anchor_rule_matches_github_examples(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# The hot path: what runs\n## Scheduler (`bench_scheduler.py`)\n## Notes\n## Notes\n"
                    "```\n# not a heading\n```\n")
    assert anchors(page) == {"the-hot-path-what-runs", "scheduler-bench_schedulerpy", "notes", "notes-1"}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        linked = (page.parent / file_part).resolve() if file_part else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading '#{fragment}' in {linked.name}")
    assert not broken, f"{page.relative_to(ROOT)} has dead links:\n" + "\n".join(broken)


def test_readme_yaml_example_is_a_valid_config(tmp_path: Path) -> None:
    """The README's jobs YAML loads as written (field names, adapter types, options), so the tour cannot drift
    from lorafusion/config.py."""
    from lorafusion.config import load_config

    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    configs = [block for block in blocks if block.startswith("run:")]
    assert configs, "README.md has no complete {run, jobs} YAML example"
    for i, block in enumerate(configs):
        path = tmp_path / f"example{i}.yaml"
        path.write_text(block)
        jobs, run = load_config(path)
        assert jobs and run.output_dir

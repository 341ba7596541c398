"""The documents against what backs them, in seconds and without training (`make docs-check`): the
rendered results tables equal what `fastcifar.render` makes of the committed JSONs, every verdict
follows the stated rule, and every relative link and anchor in README.md and docs/ resolves."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from fastcifar.reporting import figures, render

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "profiles" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def test_the_rendered_tables_are_what_the_committed_jsons_give():
    changed = render.render(ROOT, ROOT / "docs" / "results", check=True)
    assert not changed, f"stale rendered tables in {changed}: run make docs"


def test_a_digit_changed_by_hand_in_a_rendered_table_is_caught(tmp_path):
    for name in render.SECTIONS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text((ROOT / name).read_text())
    readme = (tmp_path / "README.md").read_text()
    start = readme.index(render.START.format("summary"))
    table = readme[start:readme.index(render.END.format("summary"))]
    digit = re.search(r"\d", table.split("\n", 3)[3])  # a digit in the first row of figures
    position = start + len("\n".join(table.split("\n", 3)[:3])) + 1 + digit.start()
    edited = readme[:position] + str((int(readme[position]) + 1) % 10) + readme[position + 1:]
    (tmp_path / "README.md").write_text(edited)
    assert render.render(tmp_path, ROOT / "docs" / "results", check=True) == [tmp_path / "README.md"]


@pytest.mark.parametrize("ci, comparison, expected", [
    ([5.1, 6.0], ">=", "**met**"), ([4.0, 4.9], ">=", "**not met**"), ([4.9, 5.1], ">=", "not resolved"),
    ([8.0, 9.9], "<=", "**met**"), ([10.1, 12.0], "<=", "**not met**"), ([6.7, 10.4], "<=", "not resolved"),
    (None, "<=", "not resolved (no interval)"), ([float("nan"), float("nan")], ">=", "not resolved (no interval)"),
])
def test_verdicts_follow_the_interval_rule(ci, comparison, expected):
    bound = 5.0 if comparison == ">=" else 10.0
    assert render.verdict(ci, comparison, bound) == expected


def test_every_verdict_in_the_rendered_headline_matches_its_interval():
    """Read back from docs/benchmarks.md: each verdict beside an interval ('(lo … hi', or where one more process
    lands, '95 %: lo … hi' / 'lo to hi') is the rule's verdict, unless the cell says its processes are too few."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    start = text.index(render.START.format("headline"))
    table = text[start:text.index(render.END.format("headline"))]
    rows = [line for line in table.splitlines() if "(target" in line and line.startswith("| ")]
    checked = 0
    for row in rows:
        label, *cells = [c.strip() for c in row.strip("|").split("|")]
        op, bound = (">=", float(re.search(r"≥ ([\d.]+)", label).group(1))) if "≥" in label else \
            ("<=", float(re.search(r"≤ ([\d.]+)", label).group(1)))
        for cell in cells:
            found = re.search(r"(?:\(|95 %: )([-+]?[\d.]+)[ %s×]*? ?(?:…|to) ([-+]?[\d.]+)", cell)
            if not found or ":" not in cell:
                continue
            if "within one process" in cell:  # an interval within one process never decides a verdict
                assert cell.endswith(")") and ": not resolved (one process" in cell, row
                continue
            if "the rule needs" in cell:  # too few processes: never a verdict
                assert cell.rsplit(": ", 1)[1].startswith("not resolved ("), row
                continue
            ci = [float(found.group(1)), float(found.group(2))]
            assert cell.rsplit(": ", 1)[1] == render.verdict(ci, op, bound), row
            checked += 1
    assert checked >= 3


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    broken = []
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked (no network)
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: {broken}"


PROSE = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_no_measured_figure_is_typed_by_hand():
    """Every figure in the prose is rendered, quoted from the file that holds it, or a definition (the rule:
    fastcifar/reporting/figures.py)."""
    assert not figures.problems(ROOT, PROSE), "\n".join(figures.problems(ROOT, PROSE))


def test_a_typed_figure_and_a_misquoted_one_are_caught(tmp_path):
    source = "docs/results/amd-epyc-avx2-2c/startup/after-eager.json#warm_median.data_pipeline_s"
    shutil.copytree(ROOT / "docs" / "results" / "amd-epyc-avx2-2c", tmp_path / "docs" / "results" / "amd-epyc-avx2-2c")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text(f"Quoted 4.1 s<!-- figure: {source} -->; misquoted 4.4 s<!-- figure: {source} -->; a typed\n"
                   f"12.3 s; a field that is not there 4.1 s<!-- figure: {source}x -->; targets ≤ 10 s and 95 % CI;\n"
                   "`--epochs 10` and ```code``` are not prose.\n```\n7 s in a fence\n```\n")
    found = figures.problems(tmp_path, [doc])
    assert len(found) == 3, found
    assert "4.4 s is typed, its source holds 4.13" in found[0] and "12.3 s is typed by hand" in found[1]
    assert "has no field" in found[2]


def test_the_readme_stays_a_first_screen_and_a_little_more():
    assert len((ROOT / "README.md").read_bytes()) <= 12_000  # depth belongs in docs/

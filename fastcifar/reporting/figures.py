"""Measured figures in the prose of README.md and docs/: each is rendered, or quoted from the file that holds it,
or a definition. `make docs-check` (tests/reporting/test_docs.py) fails on any other, so a figure cannot be typed
by hand and then drift from its measurement.

The rule, exactly:
- A *figure* is a number followed by a unit: s, ms, min, minutes, seconds, hours, %, ×, GB/s, MB/s, GFLOP/s,
  TFLOP/s, GFLOP, MFLOP, TFLOP, images/s, GiB, MiB, GB, MB, KB (with or without a space; `~` before it
  changes nothing). Numbers inside code (`...` or fenced blocks), inside link targets and inside the rendered
  blocks (between `make docs`'s markers, checked by the renderer itself) are not prose.
- A figure is *quoted* when an HTML comment right after it names its source:
  `<!-- figure: PATH#FIELD -->`, where PATH is relative to the checkout and FIELD a dotted path into the
  JSON (list items by index, `*` for every item: `warm.*.startup_s`); `FIELD` may be wrapped in `median(…)`,
  `mean(…)`, `min(…)`, `max(…)`, `ci95lo(…)` or `ci95hi(…)` (the ends of the 95 % interval of the mean,
  reporting.stats) of a list, and followed by ` *K` or ` /K` (a scale: ` *100` for a %). `COMMIT:PATH`
  reads the file as committed at COMMIT (`git show`): how docs/history.md quotes figures of past commits.
  The figure must equal the value rounded to the digits shown.
- A *definition* — a target, a bound the code sets, a size of the spec, an estimate the code uses — is not a
  measurement: a target or bound written with ≥, ≤, < or > before it, "95 %" naming an interval's level, or
  a phrase listed in DEFINITIONS for its document.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .stats import describe

UNITS = ("GFLOP/s", "TFLOP/s", "images/s", "GB/s", "MB/s", "GFLOP", "MFLOP", "TFLOP", "GiB", "MiB", "GB", "MB",
         "KB", "minutes", "seconds", "hours", "min", "ms", "s", "%", "×")
FIGURE = re.compile(r"(?<![\w.,])(\d[\d,]*(?:\.\d+)?)\s?(" + "|".join(re.escape(u) for u in UNITS)
                    + r")(?![\w/])(\s*<!-- figure: (.*?) -->)?")
QUOTE = re.compile(r"^(?:(?P<commit>[0-9a-f]{7,40}):)?(?P<path>[^#\s]+)#(?P<expr>\S+)(?: (?P<op>[*/])(?P<k>[\d.]+))?$")
RENDERED_START, RENDERED_END = "<!-- rendered from docs/results/", "<!-- end of rendered"
LEVEL = re.compile(r"95 % (?:CI|interval|prediction|confidence)")

# Phrases (exact text of the document, the figure inside them) that define rather than measure.
DEFINITIONS: dict[str, list[str]] = {
    "docs/reliability.md": ["64 MiB per member, 1 GiB per archive", "larger than 1 MiB", "at most 1 MiB",
                            "larger than 8 MiB"],
    "docs/testing.md": ["a 20 MB tmpfs", "a 20 GiB sparse file"],
    "docs/usage.md": ["wheel, ~420 MB"],
    "docs/gpu.md": ["| 150 s |", "| 120 s |", "| 90 s |", "| 60 s |", "| 45 s |", "| 30 s |", "default 480 s",
                    "within 8 minutes"],
    "docs/distributed.md": ["after 10 minutes"],
    "docs/design.md": ["(4× smaller than float32)", "351 × 128", "39 × 128", "78 × 128", "FFCV's 0.5 s queue timeout"],
    "docs/startup.md": ["45,000 = 351 × 128"],
    "docs/benchmarks.md": [
        "2048 × 2048", "32 × 256 × 16 × 16", "256 × 256 × 32 × 32", "each for 0.75 s", "probes of 4 s each",
        "a triad over 256 MiB", "tensors of 2 MB and more", "4 KB at a time", "67 TFLOP/s",
        "below 50 % on any CPU", "and within 3 % of", "2 and 4 MiB at batch 128", "the stem's 32 MiB",
        "one triad over 256 MiB arrays",
    ],
}


class NotInClone(Exception):
    """A quote of a past commit that a shallow clone cannot check (a full clone can)."""


@dataclass
class Figure:
    doc: str
    line: int
    text: str
    quote: str | None
    context: str


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of the prose: rendered blocks and fenced code left out, inline code and link targets
    blanked (their numbers are flags, commands and paths, not figures)."""
    out, rendered, fence = [], False, False
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith(RENDERED_START):
            rendered = True
        if line.startswith("```"):
            fence = not fence
            continue
        if not rendered and not fence:
            line = re.sub(r"`[^`]*`", "``", line)
            line = re.sub(r"\]\([^)]*\)", "]()", line)
            out.append((n, line))
        if line.startswith(RENDERED_END):
            rendered = False
    return out


def figures(doc: str, text: str) -> list[Figure]:
    found = []
    for n, line in prose_lines(text):
        for m in FIGURE.finditer(line):
            found.append(Figure(doc, n, f"{m.group(1)} {m.group(2)}", m.group(4), line))
    return found


def is_definition(fig: Figure) -> bool:
    start = fig.context.find(fig.text.split()[0])
    before = fig.context[:max(start, 0)].rstrip(" ~")
    if before.endswith(("≥", "≤", "<", ">")):
        return True
    if fig.text == "95 %" and LEVEL.search(fig.context):
        return True
    return any(phrase in fig.context and fig.text.split()[0] in phrase for phrase in DEFINITIONS.get(fig.doc, []))


def _read(root: Path, commit: str | None, path: str) -> object:
    if commit:
        done = subprocess.run(["git", "show", f"{commit}:{path}"], capture_output=True, text=True, cwd=root,
                              timeout=30)
        if done.returncode:
            shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], capture_output=True,
                                     text=True, cwd=root, timeout=30).stdout.strip()
            if shallow == "true":
                raise NotInClone(f"{commit}:{path}: a shallow clone lacks that commit")
            raise LookupError(f"{commit}:{path} is not in this clone's history")
        return json.loads(done.stdout)
    return json.loads((root / path).read_text())


def _field(data: object, dotted: str) -> object:
    head, _, rest = dotted.partition(".")
    if head == "*":
        return [_field(item, rest) if rest else item for item in data]
    data = data[int(head)] if isinstance(data, list) else data[head]
    return _field(data, rest) if rest else data


FUNCTIONS = {"median": statistics.median, "mean": statistics.fmean, "min": min, "max": max,
             "ci95lo": lambda v: describe(v)["ci95"][0], "ci95hi": lambda v: describe(v)["ci95"][1]}


def quoted_value(root: Path, quote: str) -> float:
    """The value a quote names, scaled; LookupError when the quote or its file cannot be resolved."""
    m = QUOTE.match(quote.strip())
    if not m:
        raise LookupError(f"not a quote: {quote!r} (PATH#FIELD, optionally *K or /K)")
    data = _read(root, m["commit"], m["path"])
    expr = m["expr"]
    fn = re.fullmatch(r"(\w+)\((.+)\)", expr)
    if fn and fn.group(1) not in FUNCTIONS:
        raise LookupError(f"no function {fn.group(1)}: {', '.join(FUNCTIONS)}")
    try:
        value = _field(data, fn.group(2) if fn else expr)
    except (KeyError, IndexError, ValueError, TypeError):
        raise LookupError(f"{m['path']} has no field {expr}") from None
    if fn:
        value = FUNCTIONS[fn.group(1)](value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LookupError(f"{m['path']}#{expr} is not a number")
    k = float(m["k"]) if m["k"] else 1.0
    return value * k if m["op"] != "/" else value / k


def quote_problem(root: Path, fig: Figure) -> str | None:
    """Why a quoted figure is not what its file holds (None when it is, or when a shallow clone cannot tell)."""
    shown = fig.text.split()[0].replace(",", "")
    digits = len(shown.split(".")[1]) if "." in shown else 0
    try:
        value = quoted_value(root, fig.quote)
    except NotInClone:
        return None
    except (LookupError, OSError, ValueError) as err:
        return f"{fig.doc}:{fig.line}: {fig.text}: {err}"
    if abs(value - float(shown)) > 0.5 * 10 ** -digits + 1e-9:
        return f"{fig.doc}:{fig.line}: {fig.text} is typed, its source holds {value:.{digits + 2}f}"
    return None


def problems(root: Path, docs: list[Path]) -> list[str]:
    """Every figure of `docs` (paths under `root`) typed by hand, or quoted from a file that does not hold it."""
    found = []
    for path in docs:
        doc = str(path.relative_to(root))
        for fig in figures(doc, path.read_text(encoding="utf-8")):
            if fig.quote is not None:
                found += [p for p in [quote_problem(root, fig)] if p]
            elif not is_definition(fig):
                found.append(f"{doc}:{fig.line}: {fig.text} is typed by hand: render it, or quote the file that holds "
                             "it (<!-- figure: PATH#FIELD -->), or, if it defines rather than measures, list it in "
                             "figures.DEFINITIONS")
    return found

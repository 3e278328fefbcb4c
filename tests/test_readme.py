"""The README's headline numbers are the committed report's, not a hand-kept copy that drifts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
ORDINAL = {1: "st", 2: "nd", 3: "rd"}


def _ranking(text: str) -> list[str]:
    """The rows of the first DCS ranking table in ``text`` (header and rule left out)."""
    start = text.index("| defense (strength) |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line.strip())
    return rows


def test_the_readme_headline_table_is_the_committed_reports() -> None:
    readme = (ROOT / "README.md").read_text()
    summary = (ROOT / "docs" / "benchmarks" / "core" / "summary.md").read_text()
    headline, report = _ranking(readme[readme.index("**Headline") :]), _ranking(summary)
    shown = [row for row in headline if not row.startswith("| …")]
    assert shown, "the README has no headline table"
    # Its rows are the report's, in the report's order (the head of the ranking, then `none`).
    at = [report.index(row) if row in report else -1 for row in shown]
    missing = [row for row, i in zip(shown, at, strict=True) if i < 0]
    assert not missing, (
        f"README rows not in docs/benchmarks/core/summary.md (regenerate the README table): {missing}"
    )
    assert at == sorted(at) and at[: len(at) - 1] == list(range(len(at) - 1))
    # And what it says of the undefended run's place.
    none = next(i for i, row in enumerate(report) if row.startswith("| none |")) + 1
    place = f"{none}{ORDINAL.get(none if none < 20 else none % 10, 'th')} of {len(report)}"
    said = re.search(r"the undefended run ranks\s+(\d+\w\w of \d+)", readme)
    assert said is not None and said.group(1) == place, (said and said.group(1), place)

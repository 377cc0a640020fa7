"""docs/robustness.md is the table of the cases the tests really run."""

from __future__ import annotations

from support.robustness import DOC, collect, render


def test_robustness_table_is_up_to_date() -> None:
    cases = collect()
    assert len({case.id for case in cases}) == len(cases), "case names must be unique"
    expected = render(cases)
    actual = DOC.read_text() if DOC.exists() else ""
    assert actual == expected, (
        "docs/robustness.md is stale: run `python tests/support/robustness.py --write`"
    )

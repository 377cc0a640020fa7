"""The documentation site's promises that need no Sphinx build (fast, plain).

Every public name has a reference entry, the CLI page is generated from the
parser, and the README links each page that exists. ``.ci/docs`` builds the site
itself (warnings as errors, nitpicky, doctests).
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import qmpshutdown

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API = DOCS / "api.rst"

#: ``.. autofunction:: shutdown`` and its kin, as the reference page writes them (a
#: signature written out, as for ``shutdown_sync``, allowed).
_ENTRY = re.compile(r"^\.\. auto(?:function|class|exception|data)::\s+(?:qmpshutdown\.)?(\w+)"
                    r"(?:\(.*\))?\s*$",
                    re.MULTILINE)  # fmt: skip


def documented() -> list[str]:
    return _ENTRY.findall(API.read_text())


@pytest.mark.parametrize("name", qmpshutdown.__all__)
def test_every_public_name_has_a_reference_entry(name: str) -> None:
    assert name in documented(), f"add `.. auto...:: {name}` to docs/api.rst"


def test_the_reference_documents_only_public_names_once_each() -> None:
    names = documented()
    assert sorted(set(names) - set(qmpshutdown.__all__)) == []
    assert sorted({n for n in names if names.count(n) > 1}) == []


def test_the_reference_groups_names_as_all_does() -> None:
    text = API.read_text()
    sections = re.split(r"^(Functions|Classes|Exceptions)\n-+\n", text, flags=re.MULTILINE)
    groups = dict(zip(sections[1::2], map(_ENTRY.findall, sections[2::2]), strict=True))
    public = {name: getattr(qmpshutdown, name) for name in qmpshutdown.__all__}
    kinds = {
        "Functions": [n for n, obj in public.items() if inspect.isfunction(obj)],
        "Exceptions": [
            n for n, obj in public.items() if isinstance(obj, type) and issubclass(obj, Exception)
        ],
    }
    assert sorted(groups["Functions"]) == sorted(kinds["Functions"])
    assert sorted(groups["Exceptions"]) == sorted(kinds["Exceptions"])


def test_the_cli_page_is_generated_from_the_parser() -> None:
    text = (DOCS / "cli.md").read_text()
    assert "```{argparse}\n:module: qmpshutdown._cli\n:func: build_parser\n" in text


def test_generated_files_are_included_not_copied() -> None:
    assert "```{include} ../benchmarks/RESULTS.md" in (DOCS / "benchmarks.md").read_text()
    assert "```{include} ../CHANGELOG.md" in (DOCS / "changelog.md").read_text()
    assert (DOCS / "robustness.md").exists()  # generated in place by tests/support/robustness.py


def _toctree() -> list[str]:
    index = (DOCS / "index.md").read_text()
    block = index.split("```{toctree}", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and ":" not in line]


def test_every_page_in_the_toctree_exists() -> None:
    pages = _toctree()
    assert pages, "docs/index.md has no toctree"
    missing = [p for p in pages if not any((DOCS / f"{p}{s}").exists() for s in (".md", ".rst"))]
    assert missing == []


def test_readme_links_every_page_by_its_path() -> None:
    readme = (ROOT / "README.md").read_text()
    links = set(re.findall(r"\]\((docs/[\w.-]+)\)", readme))
    for page in _toctree():
        path = next(f"docs/{page}{s}" for s in (".md", ".rst") if (DOCS / f"{page}{s}").exists())
        assert path in links, f"README.md does not link {path}"
    assert [link for link in links if not (ROOT / link).exists()] == []

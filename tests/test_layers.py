"""The package's layers, held by import-linter: an import only ever points down.

Like ``tests/test_all.py`` for ``__all__``: every module of ``qmpshutdown/`` has
its place in the contract (``pyproject.toml``, ``[tool.importlinter]``), the
contract holds on the code as it is, and it breaks on an import that points up
(a lazy one inside a function included).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (contract,) = config["tool"]["importlinter"]["contracts"]
    assert contract["type"] == "layers"
    return list(contract["layers"])


def layered_modules() -> set[str]:
    return {name.strip() for layer in contract_layers() for name in layer.split("|")}


def package_modules() -> set[str]:
    found = set()
    for path in (ROOT / "qmpshutdown").iterdir():
        if path.name == "__init__.py" or path.name.startswith("."):
            continue
        if path.suffix == ".py" or (path.is_dir() and (path / "__init__.py").exists()):
            found.add(f"qmpshutdown.{path.stem if path.suffix else path.name}")
    return found


def lint_imports(cwd: Path, package_parent: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip


def test_every_module_has_its_layer() -> None:
    assert layered_modules() == package_modules()


def test_the_layers_hold() -> None:
    run = lint_imports(ROOT, ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        # The two culprits of old: a value reaching the engine, lazily and under TYPE_CHECKING.
        ("_policy.py", "def _lazy():\n    from ._rungs import plan\n    return plan\n"),
        ("_result.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                       "    from ._qemu import Qemu\n"),
        ("_qemu.py", "from ._ladder import record\n"),
    ],
)  # fmt: skip
def test_an_import_that_points_up_breaks_the_contract(tmp_path, module, upward) -> None:
    shutil.copytree(ROOT / "qmpshutdown", tmp_path / "qmpshutdown")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "qmpshutdown" / module, "a") as source:
        source.write("\n" + upward)
    run = lint_imports(tmp_path, tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "0 kept, 1 broken" in run.stdout

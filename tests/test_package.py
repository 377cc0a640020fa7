"""The package as a user gets it: the built wheel and sdist, installed from outside.

Builds the sdist and wheel once (or takes them from ``$QMPSHUTDOWN_DIST``, where
``.ci/package`` left them), installs the wheel into a fresh venv in a temp dir
(its dependencies from the index, like any user), and runs what a user would:
import it, ``qmpshutdown --help``, ``python -m qmpshutdown --version``, and
``mypy --strict`` on a small consumer script, so ``py.typed`` is tested from
outside the source tree. Marked ``package`` (about a minute): ``-m "not package"``
leaves it out; CI runs it.
"""

from __future__ import annotations

import email.parser
import os
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import qmpshutdown

pytestmark = [pytest.mark.package, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
VERSION = qmpshutdown.__version__

#: What a consumer writes; mypy --strict must accept it using the wheel's types alone.
CONSUMER = textwrap.dedent(
    """\
    from __future__ import annotations

    from typing import assert_type

    import attrs

    import qmpshutdown
    from qmpshutdown import ShutdownPolicy, ShutdownResult, Stage, launch, shutdown


    async def stop(path: str) -> ShutdownResult:
        policy = attrs.evolve(ShutdownPolicy(), powerdown_timeout=5.0)
        assert_type(policy.bound, float)
        result = await shutdown(path, policy, pid=None)
        assert_type(result.stage, Stage | None)
        assert_type(result.summary(), str)
        return result


    async def boot(argv: list[str]) -> ShutdownResult | None:
        async with launch(argv, ShutdownPolicy(), startup_timeout=10.0) as vm:
            assert_type(vm.pid, int)
        return vm.result


    def errors(err: qmpshutdown.Error) -> str:
        if isinstance(err, qmpshutdown.ShutdownFailed):
            return err.result.summary()
        return str(err)
    """
)

#: A misuse that mypy --strict must reject: proof that the types are really seen.
MISUSE = textwrap.dedent(
    """\
    import qmpshutdown

    seconds: int = qmpshutdown.ShutdownPolicy().bound
    qmpshutdown.shutdown_sync("/run/vm.sock", pid="12")
    """
)


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 300) -> str:
    """Run a command to its end (bounded); fail with its output unless it exits 0."""
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding this version's sdist and wheel (built here if not given)."""
    given = os.environ.get("QMPSHUTDOWN_DIST")
    if given:
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--outdir", out, ROOT)
    return out


def _one(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {dist}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    return _one(dist, f"qmpshutdown-{VERSION}-py3-none-any.whl")


@pytest.fixture(scope="module")
def sdist(dist: Path) -> Path:
    return _one(dist, f"qmpshutdown-{VERSION}.tar.gz")


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv (no system site-packages) with the wheel installed; its python."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.create(env_dir, with_pip=True, clear=True)
    python = env_dir / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)
    yield python


def test_twine_accepts_the_sdist_and_wheel(wheel: Path, sdist: Path) -> None:
    run(sys.executable, "-m", "twine", "check", "--strict", wheel, sdist)


def test_wheel_metadata_has_license_classifiers_and_the_one_version(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = f"qmpshutdown-{VERSION}.dist-info"
        metadata = email.parser.Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
    assert metadata["Version"] == VERSION
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert license_text.startswith("MIT License")
    classifiers = set(metadata.get_all("Classifier") or [])
    for wanted in (
        "Typing :: Typed", "Framework :: AnyIO", "Framework :: Pytest",
        "Operating System :: POSIX :: Linux", "Programming Language :: Python :: 3.10",
    ):  # fmt: skip
        assert wanted in classifiers
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata.get_all("Project-URL")
    assert "qmpshutdown/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "fixtures/", "benchmarks/", "docs/"))]


def test_sdist_has_the_license_and_the_one_version(sdist: Path) -> None:
    with tarfile.open(sdist) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    assert {"LICENSE", "pyproject.toml", "README.md", "qmpshutdown/_version.py"} <= names
    assert "qmpshutdown/py.typed" in names


def test_installed_wheel_imports_from_the_venv(installed: Path) -> None:
    code = "import qmpshutdown; print(qmpshutdown.__version__, qmpshutdown.__file__)"
    out = run(installed, "-c", code, cwd=installed.parent)
    version, where = out.split()
    assert version == VERSION
    assert Path(where).is_relative_to(installed.parent.parent)  # the venv's, not the checkout's


def test_installed_command_help_and_version(installed: Path) -> None:
    bindir = installed.parent
    assert run(bindir / "qmpshutdown", "--help", cwd=bindir).startswith("usage: qmpshutdown ")
    out = run(installed, "-m", "qmpshutdown", "--version", cwd=bindir)
    assert out == f"qmpshutdown {VERSION}\n"


def _mypy(installed: Path, source: str, where: Path) -> subprocess.CompletedProcess[str]:
    script = where / "consumer.py"
    script.write_text(source)
    # mypy from this venv, but resolving imports in the fresh venv only (PEP 561),
    # from a directory without the source tree or its mypy configuration.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--python-version", "3.11", "--python-executable", str(installed), str(script)],
        cwd=where, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_consumer_type_checks_strictly_against_the_wheel(installed: Path, tmp_path: Path) -> None:
    proc = _mypy(installed, CONSUMER, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_misuse_is_caught_by_the_wheels_types(installed: Path, tmp_path: Path) -> None:
    proc = _mypy(installed, MISUSE, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert 'Incompatible types in assignment (expression has type "float"' in proc.stdout
    assert 'Argument "pid" to "shutdown_sync" has incompatible type "str"' in proc.stdout

"""Sphinx configuration of the qmpshutdown documentation site.

Built by ``bash .ci/docs`` (warnings are errors, nitpicky) and by Read the Docs
(``.readthedocs.yaml``). Nothing here reaches the network: intersphinx uses
inventories found on this machine and skips, with a message, any it cannot find.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any

from sphinx.util import logging

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import qmpshutdown  # noqa: E402

logger = logging.getLogger("qmpshutdown.docs")

project = "qmpshutdown"
author = "The qmpshutdown authors"
copyright = "2026, The qmpshutdown authors"
release = qmpshutdown.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinxarg.ext",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = f"qmpshutdown {release}"

myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# --- autodoc --------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
# Annotations are strings (``from __future__ import annotations``): keep the alias's name.
autodoc_type_aliases = {"Target": "qmpshutdown.Target"}

# --- intersphinx, offline only --------------------------------------------------
#: (name, base URL the links point to, local inventory files tried in order).
#: Debian's python3-doc and python-attr-doc ship theirs; .ci/setup installs them.
_INVENTORIES = [
    ("python", "https://docs.python.org/3", [
        f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/objects.inv",
        "/usr/share/doc/python3/html/objects.inv",
    ]),
    ("attrs", "https://www.attrs.org/en/stable", [
        "/usr/share/doc/python-attr-doc/html/objects.inv",
    ]),
    ("anyio", "https://anyio.readthedocs.io/en/stable", []),
    ("qemu.qmp", "https://qemu.readthedocs.io/projects/python-qemu-qmp/en/latest", []),
]  # fmt: skip
#: Read the Docs builds with network access: there the inventories that CI checks
#: offline (Python's, attrs') come from their sites; the others stay plain text
#: there too, so a build passes or fails the same way in both places.
_ONLINE = os.environ.get("READTHEDOCS") == "True"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
for _name, _url, _files in _INVENTORIES:
    _found = next((f for f in _files if os.path.exists(f)), None)
    if _ONLINE and _files:
        intersphinx_mapping[_name] = (_url, None)
    elif _found is None:
        print(f"[docs] intersphinx: no offline inventory for {_name}; its names stay plain text")
    else:
        intersphinx_mapping[_name] = (_url, _found)
intersphinx_timeout = 10

#: The top-level packages whose references may resolve through an inventory.
_LINKED = {name.split(".")[0] for name in intersphinx_mapping}

# --- nitpicky -------------------------------------------------------------------
# Every reference must resolve. Without Python's own inventory (a machine without
# Debian's python3-doc) ``int`` and ``str`` cannot, so nitpicky is then off.
nitpicky = "python" in intersphinx_mapping
if not nitpicky:
    print("[docs] nitpicky off: no inventory for Python (apt-get install python3-doc)")
#: What cannot resolve, and why; kept short. Anything else unresolved fails the build.
#: (anyio's and qemu.qmp's names, without an inventory, are handled by
#: _resolve_private below: plain text, no warning.)
nitpick_ignore_regex = [
    # Target's union names "os.PathLike[str]" as a string (a forward reference), and
    # autodoc shows it as one class of that name, subscript included.
    ("py:class", r"os\.PathLike\[str\]"),
]

# --- doctest --------------------------------------------------------------------
doctest_global_setup = """
import attrs
import qmpshutdown
from qmpshutdown import ShutdownPolicy, ShutdownResult, Stage, Step, Cause, Outcome
"""


def _public_name(target: str) -> str | None:
    """Map ``qmpshutdown._module.Name``, where a public name is defined, to ``qmpshutdown.Name``."""
    match = re.fullmatch(r"qmpshutdown\._\w+\.(\w+)((?:\.\w+)*)", target)
    if match and match.group(1) in qmpshutdown.__all__:
        return f"qmpshutdown.{match.group(1)}{match.group(2)}"
    return None


def _resolve_private(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve references the way a reader names things: by the public namespace.

    Annotations and ``__module__`` name the private module that defines a public
    name (``qmpshutdown._policy.ShutdownPolicy``); the reference page documents
    it as ``qmpshutdown.ShutdownPolicy``. A reference to a library without an
    offline inventory (anyio, qemu.qmp) is left as plain text, silently.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    public = _public_name(target)
    if public is None and target in qmpshutdown.__all__:
        public = f"qmpshutdown.{target}"
    if public is not None:
        domain = env.get_domain("py")
        node["reftarget"] = public
        return domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
        )
    top = target.lstrip("~.").split(".")[0]
    if top in {"anyio", "qemu"} and top not in _LINKED:
        return contnode  # no inventory to link to: plain text, not a warning
    return None


def _readable_signature(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None, ret: str | None
) -> tuple[str | None, str | None] | None:
    """Write defaults and aliases in a signature the way a caller would type them.

    The default policy as ``ShutdownPolicy()`` (not its long repr), an enum as
    ``Stage.QUIT`` (not ``<Stage.QUIT: 'quit'>``), and ``Target`` inside a generic
    as its name (Sphinx leaves ``TypeAliasForwardRef('qmpshutdown.Target')`` there).
    """
    if what == "class" and getattr(obj, "_is_protocol", False):
        return "", None  # a Protocol is implemented, not called: no ``(*args, **kwargs)``
    if signature is None:
        return None
    signature = signature.replace(repr(qmpshutdown.ShutdownPolicy()), "ShutdownPolicy()")
    signature = re.sub(r"TypeAliasForwardRef\('([\w.]+)'\)", r"\1", signature)
    return re.sub(r"<(\w+\.\w+): [^>]*>", r"\1", signature), ret


def _check_params(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Warn (an error under -W) when a ``:param x:`` names no parameter of the signature."""
    if what not in {"function", "method"} or not callable(obj):
        return
    try:
        parameters = set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return
    for line in lines:
        match = re.match(r"\s*:param\s+(?:[\w.\[\], |]+\s+)?(\w+):", line)
        if match and match.group(1) not in parameters:
            logger.warning(
                "%s documents :param %s: but its signature has no such parameter (%s)",
                name, match.group(1), ", ".join(sorted(parameters)) or "none",
                type="qmpshutdown", subtype="param",
            )  # fmt: skip


def _check_public_api(app: Any, env: Any) -> None:
    """Warn (an error under -W) when a name in ``qmpshutdown.__all__`` has no reference entry."""
    documented = set(env.get_domain("py").objects)
    for name in qmpshutdown.__all__:
        if f"qmpshutdown.{name}" not in documented:
            logger.warning(
                "qmpshutdown.%s is in __all__ but has no entry in docs/api.rst", name,
                type="qmpshutdown", subtype="api",
            )  # fmt: skip


def setup(app: Any) -> dict[str, Any]:
    app.connect("missing-reference", _resolve_private)
    app.connect("autodoc-process-signature", _readable_signature)
    app.connect("autodoc-process-docstring", _check_params)
    app.connect("env-check-consistency", _check_public_api)
    return {"parallel_read_safe": True}

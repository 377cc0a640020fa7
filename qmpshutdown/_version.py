"""The version of qmpshutdown: written here only (pyproject.toml reads it from this file)."""

__version__ = "0.4.1"

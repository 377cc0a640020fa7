"""Test support: fakes of the library's seams, peers that are not QEMU, the real-guest harness.

Imported as ``support.<module>`` (tests/ is on sys.path: pytest puts it there for
tests/conftest.py). Tests and benchmarks import from here, never the reverse:
nothing here imports benchmarks/, and of the tests only robustness.py reads the
``CASES`` of two test modules, to render docs/robustness.md.
"""

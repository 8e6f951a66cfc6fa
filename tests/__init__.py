"""The test suite (a package, so test modules import shared helpers as ``tests.*``)."""

import sys

# Imported before tests/conftest.py and every test module: keep their compiled form (pytest's
# assertion rewriting) and the package's byte code between runs even where
# PYTHONDONTWRITEBYTECODE is set, as on the CI machines; rewriting every test module again
# cost about 8 s of each run's start (__pycache__ is git-ignored).
sys.dont_write_bytecode = False

"""The package version (one place: packaging and every file bnrt writes read it)."""

__version__ = "0.1.0"

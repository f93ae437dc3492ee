"""The package version, in a module of its own so that low layers can read it without the package API."""

__version__ = "0.1.0"

"""Data arguments of ``qwenvl.train``: defined once in :mod:`qwenvl.arguments` (re-exported here)."""

from qwenvl.arguments import DataArguments

__all__ = ["DataArguments"]

"""Annotation files: the public face of reading (:mod:`qwenvl.data.annotation_read`) and checking
(:mod:`qwenvl.data.annotation_check`); what makes a record a valid sample is :mod:`qwenvl.data.sample_rules`.

Imports run one way: ``annotations`` -> ``annotation_check`` -> ``annotation_read`` -> ``sample_rules``. The
checking names load :mod:`~qwenvl.data.annotation_check` on first use (``print-args`` reads, never checks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwenvl.data.annotation_read import (
    PROBE_LIMIT,
    ProbeInfo,
    annotation_format,
    count_records,
    iter_records,
    oneline,
    probe,
    sample_media,
)

if TYPE_CHECKING:  # (loaded by __getattr__ on first use)
    from qwenvl.data.annotation_check import CHUNK, MAX_PER_KIND, PARALLEL_MIN_RECORDS, ScanResult, scan

__all__ = ["CHUNK", "MAX_PER_KIND", "PARALLEL_MIN_RECORDS", "PROBE_LIMIT", "ProbeInfo", "ScanResult",
           "annotation_format", "count_records", "iter_records", "oneline", "probe", "sample_media", "scan"]

_CHECK_NAMES = ("CHUNK", "MAX_PER_KIND", "PARALLEL_MIN_RECORDS", "ScanResult", "scan")


def __getattr__(name: str) -> Any:
    if name in _CHECK_NAMES:
        from qwenvl.data import annotation_check

        return getattr(annotation_check, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

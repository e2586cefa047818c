"""Annotation files: the public face of reading (:mod:`qwenvl.data.annotation_read`) and checking
(:mod:`qwenvl.data.annotation_check`); what makes a record a valid sample is :mod:`qwenvl.data.sample_rules`.

Imports run one way: ``annotations`` -> ``annotation_check`` -> ``annotation_read`` -> ``sample_rules``.
"""

from __future__ import annotations

from qwenvl.data.annotation_check import CHUNK, MAX_PER_KIND, PARALLEL_MIN_RECORDS, ScanResult, scan
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

__all__ = ["CHUNK", "MAX_PER_KIND", "PARALLEL_MIN_RECORDS", "PROBE_LIMIT", "ProbeInfo", "ScanResult",
           "annotation_format", "count_records", "iter_records", "oneline", "probe", "sample_media", "scan"]

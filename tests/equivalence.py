"""Shared by the packed-vs-one-by-one tests: how far two sets of gradients are apart."""

from __future__ import annotations


def max_rel_grad(a: dict, b: dict) -> float:
    """The largest ``max |ga - gb| / max |ga|`` over the parameters; a parameter without gradient on one side must
    have none (or only zeros) on the other."""
    worst = 0.0
    for n, ga in a.items():
        gb = b[n]
        if ga is None or gb is None:
            assert (ga is None or not ga.any()) and (gb is None or not gb.any()), n
            continue
        scale = max(float(ga.abs().max()), 1e-12)
        worst = max(worst, float((ga - gb).abs().max()) / scale)
    return worst

"""Third-party warnings that say nothing to a vlsft user, shown once per run instead of once per call.

torch 2.14 warns ``torch.distributed.reduce_scatter_tensor`` / ``all_gather_into_tensor`` are deprecated on
*every* call DeepSpeed ZeRO-3 makes (about 240 lines in an 8-step CPU run: something mutates the warning filters
each step, which resets Python's per-module "already shown" registry, so a ``once`` filter does not hold);
DataLoader's pin_memory note repeats per epoch. Rank 0 shows each such message once; other ranks drop them.
"""

from __future__ import annotations

import re
import warnings

# (category, message regex) of warnings we know and cannot act on
KNOWN: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),
    (UserWarning, r"'pin_memory' argument is set as true but no accelerator is found"),
)


def quiet_known_warnings(rank: int) -> None:
    """Wrap :func:`warnings.showwarning` so each known message appears once on rank 0 and never elsewhere."""
    original = warnings.showwarning
    if getattr(original, "_vlsft_quiet", False):
        return
    seen: set[tuple[type, str]] = set()
    patterns = [(category, re.compile(pattern)) for category, pattern in KNOWN]

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if any(issubclass(category, c) and p.match(text) for c, p in patterns):
            if rank != 0 or (category, text) in seen:
                return
            seen.add((category, text))
        original(message, category, filename, lineno, file, line)

    show._vlsft_quiet = True  # type: ignore[attr-defined]
    warnings.showwarning = show

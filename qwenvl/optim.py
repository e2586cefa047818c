"""Which AdamW implementation the trainer steps with: fused wherever torch has the kernel.

transformers 5.24 defaults ``--optim`` to ``adamw_torch_fused`` when torch >= 2.8 (``training_args.py``:
``default_optim``), i.e. ``torch.optim.AdamW(..., fused=True)``; vlsft keeps that default and makes it safe:

* ``adamw_torch_fused`` (the default) -> ``fused=True`` when every trained parameter lives on a device type with a
  fused kernel (CUDA, and also the CPU: there it is 2-6x faster than the for-each and the plain loops, measured in
  ``benchmarks/RESULTS.md``, and it reads no per-parameter step counter on the host); otherwise torch's own choice
  (for-each on CUDA-like devices, the plain loop elsewhere) instead of an error at the first step;
* any other ``--optim`` (``adamw_torch`` = for-each on CUDA / plain on CPU, ``adafactor``, ...) is the user's explicit
  choice and is left as transformers builds it.

ZeRO-Offload steps on the CPU with DeepSpeed's own CPU Adam (see :mod:`qwenvl.trainer`).
"""

from __future__ import annotations

FUSED = "adamw_torch_fused"


def fused_device_types() -> frozenset[str]:
    """Device types torch has fused AdamW kernels for (``cuda``, ``cpu``, ``xpu``, ``mps``, ...)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return frozenset(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - older torch: CUDA only
        return frozenset({"cuda"})


def adamw_kwargs(optim, params) -> dict:
    """Keyword arguments for ``torch.optim.AdamW`` given the ``--optim`` name and the trained parameters:
    ``{"fused": True}``, ``{"fused": False}`` (no fused kernel for one of their device types: torch chooses
    for-each or plain) or ``{}`` (another ``--optim``: transformers' own kwargs stand)."""
    name = str(getattr(optim, "value", optim))
    if name != FUSED:
        return {}
    devices = {p.device.type for p in params}
    return {"fused": bool(devices) and devices <= fused_device_types()}


def describe(optimizer) -> str:
    """``fused AdamW`` / ``for-each AdamW`` / ``AdamW`` / the class name, for the log."""
    defaults = getattr(optimizer, "defaults", {})
    name = type(optimizer).__name__
    if name == "AdamW":
        if defaults.get("fused"):
            return "fused AdamW"
        if defaults.get("foreach"):
            return "for-each AdamW"
    return name

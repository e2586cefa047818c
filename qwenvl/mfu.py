"""Model FLOPs utilisation: a peak-FLOPs table by device name and a FLOPs estimate per step.

FLOPs of one training step (forward + backward) are estimated as
``6 * N_llm * text_tokens + 6 * N_vision * vision_patches + 6 * n_layers * hidden * sum(L_i^2)``,
where ``N_*`` exclude embedding matrices, ``L_i`` is each sample's (segment's) length and the last term
is causal self-attention (QK^T and AV, forward 2 * 2 * L^2 * hidden / 2, times 3 for backward).
"""

from __future__ import annotations

# dense bf16 peak TFLOPs (no sparsity), matched by substring of torch.cuda.get_device_name()
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("A6000", 155.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
]


def peak_flops(device_name: str | None) -> float | None:
    """Peak dense bf16 FLOPs per second for a device name, or None when unknown."""
    if not device_name:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def step_flops(*, n_llm: int, n_vision: int, n_layers: int, hidden: int, text_tokens: int,
               vision_patches: int, sum_len_sq: int) -> float:
    return 6.0 * n_llm * text_tokens + 6.0 * n_vision * vision_patches + 6.0 * n_layers * hidden * sum_len_sq

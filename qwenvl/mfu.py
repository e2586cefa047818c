"""Model FLOPs utilisation: a peak-FLOPs table by device name and a FLOPs estimate per step.

Convention (model FLOPs, not hardware FLOPs: activation-checkpointing recomputation and padding are not
counted; a matmul with a weight of N elements costs 2 N FLOPs per token forward):

* Each part's matmul parameters are counted per token that passes through it: the language model
  (decoder layers + ``lm_head``; embedding tables excluded, a tied ``lm_head`` counted through its
  matmul) per real text token, the vision tower (patch embedding + blocks; position-embedding tables
  excluded) per patch, the merger(s) per *merged* token (patches / spatial_merge_size²).
* Per token, forward = 2 N; backward = 2 N for the input gradient when the gradient has to flow
  through the part (it, or a part before it, is trained) + 2 N for the weight gradient when the part is
  trained. Order: vision blocks -> merger -> language model. So with everything trained it is the
  familiar 6 N per token; a frozen vision tower with a trained merger costs 2 N_vision per patch and
  4 N_merger per merged token; a frozen language model that gradients must cross costs 4 N_llm.
* Causal self-attention of the language model: QK^T and AV cost 2 * 2 * L² * d / 2 per layer forward
  for a sample (segment) of L tokens, d = heads * head_dim; x3 when gradients flow through the language
  model. Vision-tower attention (windowed, at most a few % of the tower's FLOPs) is not counted.
"""

from __future__ import annotations

# dense bf16 peak TFLOPs (no sparsity; tensor cores with fp32 accumulation), matched by substring of
# torch.cuda.get_device_name(), first match wins (so longer names come before their prefixes).
# V100 and T4 have no bf16: their fp16 tensor peak is listed.
PEAK_BF16_TFLOPS: list[tuple[str, float]] = [
    ("GB200", 2500.0),
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
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
    ("RTX 4090", 165.0),  # GeForce Ada: bf16 with fp32 accumulation at full rate (165.2; 330 sparse)
    ("RTX 3090", 71.0),   # GeForce Ampere: fp32 accumulation at half rate
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
               vision_patches: int, sum_len_sq: int, n_merger: int = 0, merge_size: int = 2,
               train_vision: bool = True, train_merger: bool = True, train_llm: bool = True) -> float:
    """Model FLOPs of one forward + backward over a batch (see the module docstring).

    ``n_llm`` / ``n_vision`` / ``n_merger``: matmul parameters of each part (:func:`flop_params`);
    ``hidden``: the attention width (heads * head_dim); ``sum_len_sq``: sum of squared sample lengths.
    ``n_merger=0`` with ``n_vision`` including the merger reproduces a plain per-patch count.
    """
    grad_through_vision = train_vision
    grad_through_merger = train_vision or train_merger
    grad_through_llm = grad_through_merger or train_llm

    def factor(trained: bool, grad_flows: bool) -> float:
        return 2.0 + (2.0 if grad_flows else 0.0) + (2.0 if trained else 0.0)

    merged = vision_patches / float(merge_size * merge_size)
    attention = 2.0 * n_layers * hidden * sum_len_sq * (3.0 if grad_through_llm else 1.0)
    return (factor(train_llm, grad_through_llm) * n_llm * text_tokens
            + factor(train_vision, grad_through_vision and train_vision) * n_vision * vision_patches
            + factor(train_merger, train_vision) * n_merger * merged
            + attention)


def flop_params(model) -> dict:
    """Matmul parameter counts and trained flags of a Qwen VL model for :func:`step_flops` (ZeRO-3 aware).

    Returns ``n_llm``, ``n_vision``, ``n_merger``, ``merge_size``, ``n_layers``, ``hidden`` (attention
    width) and ``train_llm`` / ``train_vision`` / ``train_merger`` (any parameter of the part trainable).
    """
    import torch

    from qwenvl.model import numel, part_of_parameters

    parts = part_of_parameters(model)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = {"llm": 0, "vision": 0, "merger": 0}
    trained = {"llm": False, "vision": False, "merger": False}
    for name, p in model.named_parameters():  # tied weights once
        part = parts[name]
        trained[part] = trained[part] or bool(p.requires_grad)
        if id(p) not in tables:
            n[part] += numel(p)
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and inp is not None and out.weight is inp.weight:
        n["llm"] += numel(inp.weight)  # tied lm_head: the embedding matrix is also the output matmul
    cfg = model.config
    text = getattr(cfg, "text_config", cfg)
    vision = getattr(cfg, "vision_config", None)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = getattr(text, "head_dim", None) or (int(text.hidden_size) // heads if heads else 0)
    return {"n_llm": n["llm"], "n_vision": n["vision"], "n_merger": n["merger"],
            "merge_size": int(getattr(vision, "spatial_merge_size", 2) or 2),
            "n_layers": int(getattr(text, "num_hidden_layers", 0) or 0),
            "hidden": heads * int(head_dim) if heads else int(getattr(text, "hidden_size", 0) or 0),
            "train_llm": trained["llm"], "train_vision": trained["vision"], "train_merger": trained["merger"]}

"""The training loss without the ``[tokens x vocabulary]`` logits: a chunked linear + cross-entropy over the trained
tokens only, with the token-mean semantics of the whole optimizer step.

Why: the model's head turns every position of a step into 151,936 logits (bf16), which the loss then upcasts to
fp32 - for 6,300 tokens that is ~1.9 GiB of bf16 logits plus ~3.8 GiB of fp32 copies kept for the backward, and a
matmul over every image and prompt token although only the answer tokens are trained (about a third of a typical
SFT row). Here (:func:`install` swaps the class of the model's ``lm_head``, weights and names unchanged):

* while the trainer computes a loss (:func:`armed`, set by ``QwenVLTrainer.compute_loss`` with the batch's
  labels), ``lm_head`` returns the per-token cross entropy of the trained positions instead of logits: the
  hidden states of those positions are multiplied by the head in chunks of :data:`CHUNK_BYTES` of fp32 logits,
  the log-sum-exp kept per token, nothing of size ``tokens x vocabulary`` stored; the backward recomputes each
  chunk's logits (one extra head matmul over the trained tokens) and accumulates the gradients of the hidden
  states and of the head weight (a tied head shares it with the embeddings, as before);
* :func:`token_mean_loss` divides the sum by the trained tokens of the whole optimizer step (HF's
  ``num_items_in_batch``), or by the batch's own trained tokens without it - exactly what
  ``transformers.loss.loss_utils.ForCausalLMLoss`` computes (labels shifted by one, ``-100`` ignored, fp32); the
  MoE router auxiliary loss is added as the model adds it when it gets labels (``router_aux_loss_coef``);
* outside a loss computation (``chat``, ``predict``, ``generate``) the head is an ordinary linear layer.

A head that is not a plain ``nn.Linear`` (a LoRA-wrapped or quantised head) is left alone: the stock path runs.
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)

IGNORE = -100
CHUNK_BYTES = 512 * 2**20  # fp32 logits per chunk


class _Armed:
    targets: torch.Tensor | None = None  # [B * S] long: the label each position predicts (-100: none)
    positions: torch.Tensor | None = None  # [M] long: the trained positions (filled by the head)
    used = False


_STATE = _Armed()


@contextlib.contextmanager
def armed(labels: torch.Tensor | None):
    """While active, an installed head returns per-token losses for these labels (``[B, S]``, HF convention)."""
    if labels is None:
        yield
        return
    shifted = torch.full_like(labels, IGNORE)
    shifted[..., :-1] = labels[..., 1:]
    _STATE.targets, _STATE.positions, _STATE.used = shifted.reshape(-1), None, False
    try:
        yield
    finally:
        _STATE.targets, _STATE.used = None, False


def chunk_rows(vocab: int) -> int:
    return max(64, CHUNK_BYTES // (4 * max(vocab, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of ``hidden @ weight.T`` against ``targets`` (all valid), chunked over tokens."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            logits = (hidden[s:s + rows] @ weight.t()).float()  # the head's dtype, then fp32 as the HF loss does
            lse[s:s + rows] = torch.logsumexp(logits, dim=-1)
            losses[s:s + rows] = lse[s:s + rows] - logits.gather(1, targets[s:s + rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.rows = rows
        return losses

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse = ctx.saved_tensors
        rows = ctx.rows
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s:s + rows]
            p = torch.exp((h @ weight.t()).float() - lse[s:s + rows, None])  # softmax
            p[torch.arange(h.shape[0], device=p.device), targets[s:s + rows]] -= 1.0
            p *= grad[s:s + rows, None].float()
            if need_h:
                grad_h[s:s + rows] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:  # the matmul in the head's dtype (fp32 accumulation inside), chunks summed in fp32
                grad_w += (p.to(weight.dtype).t() @ h.to(weight.dtype)).float()
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None


class _LossHeadMixin:
    """``lm_head`` whose forward returns the trained tokens' losses while :func:`armed` (see the module doc)."""

    _vlsft_loss_head = True

    def forward(self, hidden_states):
        targets = _STATE.targets
        if targets is None or _STATE.used or hidden_states.shape[:-1].numel() != targets.numel():
            return super().forward(hidden_states)
        _STATE.used = True  # one loss per armed forward
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        targets = targets.to(flat.device)
        positions = (targets != IGNORE).nonzero().squeeze(1)  # one host sync per step
        _STATE.positions = positions
        sel_targets = targets.index_select(0, positions)
        if self.bias is not None:  # no Qwen head has one; keep the stock path exact if a model does
            logits = super().forward(flat.index_select(0, positions)).float()
            return torch.nn.functional.cross_entropy(logits, sel_targets, reduction="none")
        return _LinearCrossEntropy.apply(flat.index_select(0, positions), self.weight, sel_targets,
                                         chunk_rows(self.weight.shape[0]))


_CLASSES: dict[type, type] = {}


def install(model) -> bool:
    """Give the model's ``lm_head`` the chunked loss path (True when done; see the module doc)."""
    head = getattr(model, "lm_head", None)
    if head is None:
        base = getattr(model, "get_base_model", None)
        head = getattr(base(), "lm_head", None) if base is not None else None
    if head is None or getattr(type(head), "_vlsft_loss_head", False):
        return head is not None
    if type(head) is not torch.nn.Linear:
        return False
    cls = _CLASSES.setdefault(type(head), type("LossHeadLinear", (_LossHeadMixin, type(head)),
                                               {"__module__": __name__}))
    head.__class__ = cls
    return True


def token_mean_loss(outputs, labels, num_items_in_batch=None, aux_coef: float = 0.0):
    """Causal-LM loss summed over tokens / trained tokens of the whole optimizer step (all micro-batches, all
    ranks: HF's ``num_items_in_batch``), so per-device batch x accumulation x ranks splits give the same
    update; without it, the mean over this batch's trained tokens. ``outputs.logits`` is either the per-token
    losses of an installed head (1-D) or ordinary logits. Plus ``aux_coef x outputs.aux_loss`` (MoE router)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.dim() == 1:  # per-token losses of the trained positions (an installed head under armed())
        total = logits.sum()
        n = num_items_in_batch if num_items_in_batch is not None else max(logits.numel(), 1)
        loss = total / (n.to(total.device) if torch.is_tensor(n) else n)
    else:
        from transformers.loss.loss_utils import ForCausalLMLoss

        loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=num_items_in_batch)
    aux = outputs.get("aux_loss") if isinstance(outputs, dict) else getattr(outputs, "aux_loss", None)
    if aux_coef and aux is not None:
        loss = loss + aux_coef * aux.to(loss.device)
    return loss


def per_token(outputs):
    """(losses [M], positions [M]) of the last armed forward, or None when the head returned logits."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if logits.dim() == 1 and _STATE.positions is not None:
        return logits, _STATE.positions
    return None

"""qwenvl.loss: the chunked head loss equals the model's own loss (transformers' ForCausalLMLoss, + the MoE router
loss) and its gradients, in fp32, for every family, across chunk boundaries, with and without num_items_in_batch;
per-dataset sums equal the logits-based ones; no [tokens x vocabulary] tensor is made; the head is an ordinary
linear layer outside a loss computation."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from qwenvl import loss as qloss  # noqa: E402
from qwenvl.tiny import VOCAB_SIZE, tiny_config  # noqa: E402
from qwenvl.trainer import dataset_loss_sums, dataset_loss_sums_of_tokens  # noqa: E402

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"]


def _model(family):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    m = AutoModelForImageTextToText.from_config(tiny_config(family), attn_implementation="sdpa",
                                                dtype=torch.float32)
    m.config.use_cache = False
    m.train()
    return m


def _batch(rows=2, length=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 150000, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :40] = -100  # the prompt
    labels[0, 90:100] = -100
    labels[-1, 120:] = -100  # padding-like tail
    datasets = torch.zeros_like(ids)
    datasets[:, 75:] = 1
    datasets[-1, 140:] = -1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}, labels, datasets


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_items", [None, 300])
def test_equal_to_the_models_own_loss_and_gradients(family, num_items, monkeypatch):
    monkeypatch.setattr(qloss, "CHUNK_BYTES", 4 * VOCAB_SIZE * 64)  # 64 rows per chunk: several chunks
    stock = _model(family)
    fast = copy.deepcopy(stock)
    assert qloss.install(fast)
    inputs, labels, _ = _batch()
    text = stock.config.text_config
    coef = float(text.router_aux_loss_coef) if getattr(text, "output_router_logits", False) else 0.0
    if num_items is None:  # the model's own loss (labels given): HF mean + the router loss
        want = stock(**inputs, labels=labels).loss
    else:
        from transformers.loss.loss_utils import ForCausalLMLoss

        out = stock(**inputs)
        want = ForCausalLMLoss(out.logits, labels, vocab_size=out.logits.shape[-1],
                               num_items_in_batch=torch.tensor(num_items))
        if coef:
            want = want + coef * out.aux_loss
    want.backward()
    with qloss.armed(labels):
        out = fast(**inputs)
        assert out.logits.dim() == 1 and out.logits.numel() == int((labels[:, 1:] != -100).sum())
        got = qloss.token_mean_loss(out, labels, None if num_items is None else torch.tensor(num_items),
                                    aux_coef=coef)
    got.backward()
    assert abs(got.item() - want.item()) <= 1e-6 * max(1.0, abs(want.item()))
    grads = dict(fast.named_parameters())
    for name, p in stock.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None or not grads[name].grad.any(), name
            continue
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-6, rtol=1e-4), (name, (p.grad - grads[name].grad)
                                                                                .abs().max())


def test_per_dataset_sums_equal_the_logits_based_ones():
    model = _model("qwen2_5_vl")
    inputs, labels, datasets = _batch()
    with torch.no_grad():
        want = dataset_loss_sums(model(**inputs), labels, datasets, 2)
        qloss.install(model)
        with qloss.armed(labels):
            losses, positions = qloss.per_token(model(**inputs))
    got = dataset_loss_sums_of_tokens(losses, positions, datasets, 2)
    assert torch.allclose(got, want, rtol=1e-6)
    assert got[2:].sum() > 0


def test_no_tokens_by_vocabulary_tensor_and_plain_head_outside_a_loss(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(qloss, "CHUNK_BYTES", 4 * VOCAB_SIZE * 64)
    model = _model("qwen2_5_vl")
    inputs, labels, _ = _batch(rows=1, length=300)
    qloss.install(model)

    class Biggest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t) and t.dim() >= 1 and t.shape[-1] == VOCAB_SIZE and t.dim() >= 2:
                    Biggest.rows = max(Biggest.rows, t.numel() // VOCAB_SIZE)
            return out

    with Biggest(), qloss.armed(labels):
        loss = qloss.token_mean_loss(model(**inputs), labels)
        loss.backward()
    assert 0 < Biggest.rows <= 64  # one chunk of logits at a time, never 300 x vocabulary
    with torch.no_grad():  # outside armed(): ordinary logits (chat, predict, generate)
        assert model(**inputs).logits.shape == (1, 300, VOCAB_SIZE)


def test_a_wrapped_head_is_left_alone():
    model = _model("qwen2_5_vl")

    class Other(torch.nn.Linear):
        pass

    model.lm_head.__class__ = Other
    assert qloss.install(model) is False

"""hpr.continuations: shared prefixes run once, with the same outputs and gradients as whole sequences."""

import pytest
import torch

from hpr.continuations import common_prefix, shared_prefix_forward
from hpr.encoding import encode_all, pad_batch, pad_token_id


def _pairs(primer: str):
    g = torch.Generator().manual_seed(0)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, 40, (n,), generator=g).tolist())

    return [(primer + " " + words(2 + q), " " + words(n)) for q in range(4) for n in (1, 3, 2)]


def test_common_prefix():
    assert common_prefix([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2
    assert common_prefix([(5,), (6,)]) == 0 and common_prefix([]) == 0


@pytest.mark.parametrize("family", ["gpt2-like", "llama-like"])
def test_shared_prefix_forward_equals_whole_sequences_outputs_and_gradients(family, tiny_lm):
    model = tiny_lm(family)
    batch = encode_all(model, _pairs("w1 w2 w3 w4 w5 w6 w7 w8"))
    pad_id = pad_token_id(model)
    weight = model.blocks[0].ln1.w  # a parameter the cached prefix keys and values depend on

    def loss_and_grad(shared: bool):
        weight.grad = None
        if shared:
            logits, ids, lengths, k = shared_prefix_forward(model, batch, pad_id, return_type="logits")
        else:
            ids, lengths = pad_batch(batch, pad_id)
            logits, k = model(ids, return_type="logits"), 0
        picked = [logits[i, len(e.tokens) - 1 - k].log_softmax(-1)[e.tokens[-1]] for i, e in enumerate(batch)]
        loss = -torch.stack(picked).sum()
        loss.backward()
        return loss.detach(), weight.grad.clone(), k

    whole, whole_grad, _ = loss_and_grad(False)
    shared, shared_grad, k = loss_and_grad(True)
    assert k >= 8  # the primer (and BOS) really were shared
    torch.testing.assert_close(shared, whole, rtol=0, atol=1e-4)
    torch.testing.assert_close(shared_grad, whole_grad, rtol=1e-4, atol=1e-5)

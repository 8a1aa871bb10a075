"""hpr.scoring against the plain definition: every pair run whole, log-softmax at every position, summed.

Tiny random models of both families (learned positions + LayerNorm; rotary + RMSNorm + gated MLP + GQA),
with and without an edit attached, including contexts truncated on the left and shared by several
continuations of different lengths (the KV-cache path) or by none (the whole-sequence path).
"""

import pytest
import torch

from hpr import positions
from hpr.editors.hpr import HPREditor, LayerwiseHPR
from hpr.scoring import encode_all, score


def _words(g, n):
    return " ".join(f"w{i}" for i in torch.randint(0, 40, (n,), generator=g).tolist())


def _pairs():
    g = torch.Generator().manual_seed(0)
    pairs = []
    for q in range(4):  # four contexts, each with continuations of 1 to 5 words
        context = _words(g, 6 + 3 * q)
        pairs += [(context, " " + _words(g, n)) for n in (1, 3, 2, 5, 1)]
    pairs += [(_words(g, 9), " " + _words(g, 4))]  # a context of its own
    pairs += [pairs[2], pairs[0]]  # duplicates
    pairs += [(_words(g, 40), " " + _words(g, 3)), (_words(g, 40), " " + _words(g, 2))]  # truncated on the left
    return pairs


@torch.inference_mode()
def _reference(model, pairs):
    out = []
    for e in encode_all(model, pairs):
        total = len(e.tokens)
        with positions.marked(positions.whole_sequence_kinds([total - e.n_cont], [total], total)):
            logprobs = model(torch.tensor([e.tokens])).log_softmax(-1)[0]
        out.append(sum(float(logprobs[t - 1, e.tokens[t]]) for t in range(total - e.n_cont, total)))
    return out


@pytest.mark.parametrize("family", ["gpt2-like", "llama-like"])
@pytest.mark.parametrize("edited", [False, True])
def test_scores_match_whole_sequence_definition(family, edited, tiny_lm):
    model = tiny_lm(family)
    pairs = _pairs()
    assert max(len(e.tokens) for e in encode_all(model, pairs)) == model.cfg.n_ctx  # truncation exercised
    editor = HPREditor.from_layerwise(LayerwiseHPR(2, 32), (0, 1)) if edited else None
    with editor.applied(model) if editor else torch.inference_mode():
        expected = _reference(model, pairs)
        shared = score(model, pairs, batch_size=16)  # several contexts per batch: left padding
        whole = score(model, pairs, batch_size=4, share_prefix=False)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(expected), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(whole), torch.tensor(expected), rtol=0, atol=1e-4)
    if edited:  # the edit reaches the scores on both paths
        plain = score(model, pairs)
        assert max(abs(a - b) for a, b in zip(plain, shared, strict=True)) > 1e-3


@pytest.mark.parametrize("mode", positions.MODES)
def test_every_position_mode_scores_alike_on_both_paths(mode, tiny_lm):
    """Shared-prefix and whole-sequence scoring mark the same positions as the one-sequence definition."""
    model = tiny_lm("llama-like")
    pairs = _pairs()
    torch.manual_seed(0)
    editor = HPREditor.from_layerwise(LayerwiseHPR(2, 32), (0, 1)).with_positions(mode)
    plain = score(model, pairs)
    with editor.applied(model):
        expected = _reference(model, pairs)
        shared = score(model, pairs, batch_size=16)
        whole = score(model, pairs, batch_size=4, share_prefix=False)
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(expected), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(whole), torch.tensor(expected), rtol=0, atol=1e-4)
    assert max(abs(a - b) for a, b in zip(plain, shared, strict=True)) > 1e-3  # the edit reaches the scores


def test_scores_do_not_depend_on_batch_size(tiny_lm):
    model = tiny_lm("llama-like")
    pairs = _pairs()
    one, many = score(model, pairs, batch_size=1), score(model, pairs, batch_size=64)
    torch.testing.assert_close(torch.tensor(one), torch.tensor(many), rtol=0, atol=1e-5)


def test_mixed_lengths_near_the_context_window(tiny_lm):
    """A long context with a short answer shares a batch with a short context and a long answer: padding must
    not push positions past n_ctx (it did when pads took positions: IndexError in the position embedding)."""
    model = tiny_lm("gpt2-like")  # learned absolute positions, n_ctx 32
    pairs = [
        (" ".join(["w1"] * 27), " w2 w2"),
        (" ".join(["w1"] * 27), " w2"),
        ("w3 w4 w5", " " + " ".join(["w6"] * 8)),
        ("w3 w4 w5", " w7"),
    ]
    expected = _reference(model, pairs)
    for share_prefix in (True, False):
        got = score(model, pairs, batch_size=16, share_prefix=share_prefix)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-4)

"""hpr.activations: answer-token activations, their resumable safetensors shards, and loading them back."""

import pytest
import torch

from hpr import activations
from hpr.data import PromptFormat
from hpr.data.schema import Choice, MCQuestion
from hpr.scoring import encode_all


def _questions(n: int):
    g = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(f"w{i}" for i in torch.randint(0, 40, (k,), generator=g).tolist())

    qs = []
    for i in range(n):
        mc2 = tuple(Choice(words(1 + (i + j) % 4), j == 0) for j in range(3))
        qs.append(MCQuestion(f"q{i}", words(5 + i % 3), mc2[:2], mc2))
    return qs


FMT = PromptFormat(primer="")
PRIMED = PromptFormat(primer="w1 w2 w3 w4 w5 w6 w7", separator=" ")  # a prefix shared by every context


@pytest.mark.parametrize("fmt", [FMT, PRIMED], ids=["no-primer", "primer"])
@pytest.mark.parametrize("family", ["gpt2-like", "llama-like"])
def test_answer_activations_are_resid_post_at_the_answer_tokens(family, fmt, tiny_lm):
    model = tiny_lm(family)
    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in _questions(5) for c in q.mc2]
    got = activations.answer_activations(model, pairs, batch_size=4)
    for (_ctx, _cont), e, acts in zip(pairs, encode_all(model, pairs), got, strict=True):
        _, cache = model.run_with_cache(torch.tensor([e.tokens]))
        expected = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0] for l in range(2)], dim=1)[-e.n_cont :]
        assert acts.shape == (e.n_cont, 2, 32)
        torch.testing.assert_close(acts, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp16", [False, True])
def test_collect_shards_load_back_and_resume(tiny_lm, tmp_path, monkeypatch, fp16):
    model = tiny_lm("gpt2-like")
    qs = _questions(7)
    got = activations.collect(model, qs, FMT, tmp_path, questions_per_shard=3, batch_size=4, fp16=fp16)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    pairs = [(FMT.context(q), FMT.continuation(c.text)) for q in qs for c in q.mc2]
    direct = activations.answer_activations(model, pairs)
    assert got.acts.dtype == torch.float32 and len(got.offsets) == len(pairs) + 1
    assert got.question_ids == [q.id for q in qs for _ in q.mc2]
    assert got.is_true == [c.is_true for q in qs for c in q.mc2]
    for j, acts in enumerate(direct):
        tol = dict(rtol=1e-3, atol=1e-3) if fp16 else dict(rtol=1e-5, atol=1e-5)  # other batches: rounding
        torch.testing.assert_close(got.answer(j), acts, **tol)

    def fail(*args, **kwargs):
        raise AssertionError("finished shards must not be recomputed")

    monkeypatch.setattr(activations, "gather_continuations", fail)
    again = activations.collect(model, qs, FMT, tmp_path, questions_per_shard=3, batch_size=4, fp16=fp16)
    assert torch.equal(again.acts, got.acts)
    monkeypatch.undo()
    fewer = activations.collect(model, qs[:3], FMT, tmp_path, questions_per_shard=3, fp16=fp16)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 1  # stale shards of the longer run removed
    assert fewer.question_ids == got.question_ids[:9]


def test_load_without_shards_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation shards"):
        activations.load(tmp_path)


def test_collecting_builds_no_graph(tiny_lm, tmp_path):
    """Loaded or not, a model's parameters may require grad: collection must still record no autograd graph."""
    model = tiny_lm("llama-like")
    assert any(p.requires_grad for p in model.parameters())  # the fixture's fresh model: the hard case
    got = activations.collect(model, _questions(4), PRIMED, tmp_path, questions_per_shard=2, batch_size=3)
    assert got.acts.grad_fn is None and not got.acts.requires_grad
    direct = activations.answer_activations(
        model, [(PRIMED.context(q), PRIMED.continuation(c.text)) for q in _questions(2) for c in q.mc2]
    )
    assert all(a.grad_fn is None for a in direct)
    heads = activations.last_token_activations(
        model, [(PRIMED.context(q), " w3") for q in _questions(3)], ["blocks.1.attn.hook_z", "blocks.0.hook_resid_post"]
    )
    assert heads["blocks.1.attn.hook_z"].shape == (3, 4, 8) and heads["blocks.0.hook_resid_post"].shape == (3, 32)
    assert all(t.grad_fn is None and t._base is None for t in heads.values())  # copies, not views of a batch


@pytest.mark.parametrize("fmt", [FMT, PRIMED], ids=["no-primer", "primer"])
def test_last_token_activations_match_whole_sequences(fmt, tiny_lm):
    model = tiny_lm("llama-like")
    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in _questions(4) for c in q.mc2]
    pairs.append(pairs[1])  # a duplicate is answered too
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_post"]
    got = activations.last_token_activations(model, pairs, names, batch_size=3)
    for i, e in enumerate(encode_all(model, pairs)):
        _, cache = model.run_with_cache(torch.tensor([e.tokens]))
        for name in names:
            torch.testing.assert_close(got[name][i], cache[name][0, -1], rtol=1e-5, atol=1e-5)


def test_probe_accuracy_read_shard_by_shard_equals_the_whole_split(tiny_lm, tmp_path):
    from hpr.editors.hpr import probe_accuracy, split_probe_accuracy

    model = tiny_lm("gpt2-like")
    got = activations.collect(model, _questions(7), PRIMED, tmp_path, questions_per_shard=3, batch_size=4)
    assert len(activations.shard_paths(tmp_path)) == 3
    probe = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    pos, neg, _ = got.token_pair_rows()
    expected = probe_accuracy(probe, pos, neg, chunk=5)  # chunked too: the same counts
    assert expected == probe_accuracy(probe, pos[:], neg[:])
    torch.testing.assert_close(torch.tensor(split_probe_accuracy(probe, tmp_path)), torch.tensor(expected))

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


@pytest.mark.parametrize("family", ["gpt2-like", "llama-like"])
def test_answer_activations_are_resid_post_at_the_answer_tokens(family, tiny_lm):
    model = tiny_lm(family)
    pairs = [(FMT.context(q), FMT.continuation(c.text)) for q in _questions(5) for c in q.mc2]
    got = activations.answer_activations(model, pairs, batch_size=4)
    for (ctx, cont), e, acts in zip(pairs, encode_all(model, pairs), got):
        _, cache = model.run_with_cache(torch.tensor([e.tokens]))
        expected = torch.stack([cache[f"blocks.{l}.hook_resid_post"][0] for l in range(2)], dim=1)[-e.n_cont:]
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
        tol = dict(rtol=1e-3, atol=1e-3) if fp16 else dict(rtol=0, atol=0)
        torch.testing.assert_close(got.answer(j), acts, **tol)

    def fail(*args, **kwargs):
        raise AssertionError("finished shards must not be recomputed")

    monkeypatch.setattr(activations, "_answer_activations", fail)
    again = activations.collect(model, qs, FMT, tmp_path, questions_per_shard=3, batch_size=4, fp16=fp16)
    assert torch.equal(again.acts, got.acts)
    monkeypatch.undo()
    fewer = activations.collect(model, qs[:3], FMT, tmp_path, questions_per_shard=3, fp16=fp16)
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 1  # stale shards of the longer run removed
    assert fewer.question_ids == got.question_ids[:9]


def test_load_without_shards_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation shards"):
        activations.load(tmp_path)

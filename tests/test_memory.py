"""Memory is part of correctness: collecting activations keeps one batch alive at a time, whatever the data size.

Peak RSS growth is sampled by a thread while the call runs (bench.memory_worker.peak_growth). The model is
sized so that one batch's activations are tens of MB: code that keeps a view into every batch (the old ITI
head collection kept each batch's whole ``hook_z`` cache) grows by hundreds of MB between the two sizes, far
beyond the slack; code that copies out what it keeps grows by its result alone.
"""

import functools

import pytest
import torch

from bench.memory_worker import peak_growth
from hpr import activations
from hpr.data import PromptFormat
from hpr.data.schema import Choice, MCQuestion
from hpr.editors.iti import answer_head_activations

SLACK = 80 * 2**20  # allocator noise (~50 MB seen under load); a leak of one batch per batch is ~5x this


@pytest.fixture(scope="module")
def wide_lm(word_tokenizer):
    """4 layers, d_model 256, 8 heads and 400-token prompts: one batch of 8 is ~30 MB of head outputs."""
    from hpr.models import new_hooked_transformer

    cfg = dict(
        n_layers=4,
        d_model=256,
        n_heads=8,
        d_head=32,
        d_mlp=512,
        n_ctx=512,
        d_vocab=44,
        normalization_type="LN",
        act_fn="gelu",
    )
    model = new_hooked_transformer(cfg, word_tokenizer, seed=0).eval()
    model.cfg.default_prepend_bos = True
    return model  # parameters require grad, as a freshly built model's do: the hard case


def _questions(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{i}" for i in torch.randint(0, 40, (k,), generator=g).tolist())

    # Distinct contexts (no shared primer), so every question really runs its 400 tokens.
    return [
        MCQuestion(
            f"q{i}",
            words(400),
            (Choice(words(3), True), Choice(words(3), False)),
            (Choice(words(3), True), Choice(words(3), False)),
        )
        for i in range(n)
    ]


FMT = PromptFormat(primer="")


def _smaller_growth(call):
    """``call(attempt)`` twice, keeping the result and peak growth of the smaller: a leak grows in every call
    alike, while the allocator's state after the rest of the suite can add tens of MB to one call and not the
    next."""
    runs = [peak_growth(functools.partial(call, attempt)) for attempt in range(2)]
    return min(runs, key=lambda run: run[1])


def test_head_activations_memory_is_the_result_plus_one_batch(wide_lm):
    small, big = _questions(8), _questions(96, seed=1)
    (z_small, _), grown_small = peak_growth(lambda: answer_head_activations(wide_lm, small, FMT, batch_size=8))
    (z_big, _), grown_big = _smaller_growth(lambda attempt: answer_head_activations(wide_lm, big, FMT, batch_size=8))
    overhead_small = grown_small - z_small.numel() * 4
    overhead_big = grown_big - z_big.numel() * 4
    assert z_big.grad_fn is None and z_big._base is None
    assert overhead_big <= max(overhead_small, 0) + SLACK, (overhead_small / 2**20, overhead_big / 2**20)


def test_collect_memory_does_not_grow_with_the_number_of_shards(wide_lm, tmp_path):
    def run(questions, folder):
        return activations.collect(wide_lm, questions, FMT, tmp_path / folder, questions_per_shard=8, batch_size=8)

    small, big = _questions(8), _questions(64, seed=1)
    got_small, grown_small = peak_growth(lambda: run(small, "small"))
    got_big, grown_big = _smaller_growth(lambda attempt: run(big, f"big{attempt}"))
    assert len(list((tmp_path / "big0").glob("shard-*.safetensors"))) == 8
    overhead_small = grown_small - got_small.acts.numel() * 4
    overhead_big = grown_big - got_big.acts.numel() * 4
    assert got_big.acts.grad_fn is None
    assert overhead_big <= max(overhead_small, 0) + SLACK, (overhead_small / 2**20, overhead_big / 2**20)

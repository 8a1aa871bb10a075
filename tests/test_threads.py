"""Threads: fits on one thread, forward passes on several, and nothing that depends on the count."""

import json

import pandas as pd
import pytest
import torch

from hpr import threads
from hpr.cli import main
from hpr.scoring import score


def test_one_thread_restores_the_callers_count():
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        with threads.one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        with pytest.raises(KeyError), threads.one_thread():
            raise KeyError("a failing fit")
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_reproducible_gives_forward_passes_their_threads_and_fits_one(tiny_tl_model):
    model = tiny_tl_model().eval()
    seen = []
    model.blocks[0].hook_resid_post.add_hook(lambda act, hook: seen.append(torch.get_num_threads()))
    tokens = torch.tensor([[1, 2, 3]])
    before = torch.get_num_threads()
    try:
        with threads.reproducible(model, pass_threads=3):
            assert torch.get_num_threads() == 1  # a fit's own work
            model(tokens)
            assert seen == [3] and torch.get_num_threads() == 1
            # A pass that raises still hands the fit back its single thread.
            model.blocks[0].hook_resid_post.add_hook(lambda act, hook: 1 / 0)
            with pytest.raises(ZeroDivisionError):
                model(tokens)
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == before
        assert not model._forward_hooks and not model._forward_pre_hooks
    finally:
        model.reset_hooks()
    with pytest.raises(ValueError, match="at least 1"), threads.reproducible(model, pass_threads=0):
        pass


def test_scores_and_activations_are_bit_identical_across_pass_threads(word_tokenizer):
    """Wide enough (d_model 256, MLP 1024, 4096 logits) that matrix products split over threads: same bits."""
    from hpr.models import new_hooked_transformer

    cfg = dict(n_layers=2, d_model=256, n_heads=4, d_head=64, d_mlp=1024, n_ctx=64, d_vocab=4096)
    cfg.update(normalization_type="RMS", act_fn="silu", positional_embedding_type="rotary", rotary_dim=16)
    cfg.update(gated_mlp=True, n_key_value_heads=2)
    model = new_hooked_transformer(cfg, word_tokenizer, seed=0).eval()
    pairs = [(" ".join(f"w{(i * 7 + j) % 40}" for j in range(12)), f" w{i % 40} w{(i + 3) % 40}") for i in range(24)]
    tokens = torch.randint(4, 44, (8, 30), generator=torch.Generator().manual_seed(0))

    def measured(n: int):
        with threads.reproducible(model, pass_threads=n), torch.inference_mode():
            logits, cache = model.run_with_cache(tokens)
            return score(model, pairs, batch_size=5), logits, cache["blocks.1.hook_resid_post"]

    one, four = measured(1), measured(4)
    assert one[0] == four[0]
    assert torch.equal(one[1], four[1]) and torch.equal(one[2], four[2])


def test_a_run_is_bit_identical_for_any_pass_threads(tiny_toy, tmp_path):
    """Every file of a run folder but the timings: the same bytes with one and with two pass threads."""
    methods = "base,hpr,hpr_no_angle,iti15,caa,diff,sea,sadi"
    folders = {}
    for n in (1, 2):
        folders[n] = tmp_path / f"threads{n}"
        argv = ["reproduce", "--out", str(folders[n]), "--quiet", "--methods", methods, "--threads", str(n)]
        assert main(argv) == 0
    files = sorted(p.relative_to(folders[1]) for p in folders[1].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(folders[2]) for p in folders[2].rglob("*") if p.is_file())
    for rel in files:
        a, b = folders[1] / rel, folders[2] / rel
        if rel.name == "results.json":
            ra, rb = (json.loads(p.read_text()) for p in (a, b))
            ra.pop("timings_s"), rb.pop("timings_s")
            assert ra == rb
        elif rel.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), check_exact=True)
        else:
            assert a.read_bytes() == b.read_bytes(), rel

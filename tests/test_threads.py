"""Threads: fits on one thread, forward passes on the threads asked for."""

import pytest
import torch

from hpr import threads


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


def test_a_run_does_its_forward_passes_on_one_thread_by_default(tiny_toy, tmp_path, monkeypatch):
    """The default is the bit-reproducible one: one thread in the passes too, whatever torch would use."""
    from transformer_lens import HookedTransformer

    from hpr.cli import main

    seen = set()
    forward = HookedTransformer.forward

    def recording(self, *args, **kwargs):
        seen.add(torch.get_num_threads())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(HookedTransformer, "forward", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["reproduce", "--out", str(tmp_path / "one"), "--quiet", "--methods", "base,caa"]) == 0
        assert seen == {1}
        seen.clear()
        argv = ["reproduce", "--out", str(tmp_path / "two"), "--quiet", "--methods", "base,caa", "--threads", "2"]
        assert main(argv) == 0
        assert seen == {2}
    finally:
        torch.set_num_threads(before)

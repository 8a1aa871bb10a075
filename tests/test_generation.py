"""Batched greedy generation (``hpr.generation.greedy_batch``) gives each prompt what one-at-a-time ``greedy``
gives it, token for token: with no editor and with editors in every positions mode, with stop ids and stop
strings, in batches smaller than the prompt list."""

import pytest
import torch

from hpr import generation
from hpr.editors.caa import CAAEditor
from hpr.editors.hpr import HPREditor, LayerwiseHPR
from hpr.editors.iti import ITIEditor
from hpr.editors.sadi import fit_sadi

PRIMER = [3, 17, 8, 41, 22, 5]  # shared by every prompt
RESTS = [[9], [30, 2, 14], [7, 7], [44, 1, 6, 28], [12, 12, 40]]  # each prompt's own tokens, lengths 1-4
NEW = 5  # the tiny model's n_ctx is 16: primer 6 + rest 4 + 5 new tokens fit


@pytest.fixture(scope="module")
def model(tiny_tl_model):
    return tiny_tl_model().eval()


def _prompts():
    return [PRIMER + r for r in RESTS]


def _one_at_a_time(model, prompts, max_new_tokens=NEW, **stops):
    return [generation.greedy(model, p, max_new_tokens, **stops) for p in prompts]


def _hpr():
    torch.manual_seed(0)
    return HPREditor.from_layerwise(LayerwiseHPR(3, 32), (1, 2))


def _iti():
    g = torch.Generator().manual_seed(0)
    directions = {(1, 0): torch.randn(16, generator=g), (2, 1): torch.randn(16, generator=g)}
    return ITIEditor.from_heads(directions, {(1, 0): 3.0, (2, 1): 3.0}, 30.0, n_layers=3, n_heads=2)


def _caa():
    return CAAEditor.from_vectors({1: 3 * torch.randn(32, generator=torch.Generator().manual_seed(0))}, 8.0, 3)


def _sadi():
    mean_diff = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    return fit_sadi(mean_diff, k=8, delta=20.0, level="hidden", d_model=32)


def test_batched_equals_one_at_a_time_without_an_editor(model):
    prompts = _prompts()
    expected = _one_at_a_time(model, prompts)
    got = generation.greedy_batch(model, prompts, NEW)
    assert got == expected
    assert all(len(g) == NEW and all(type(t) is int for t in g) for g in got)


@pytest.mark.parametrize(
    "make,mode",
    [(_hpr, "all"), (_iti, "answer"), (_caa, "from_prompt_end"), (_sadi, "prompt_end"), (_iti, "all")],
    ids=["hpr-all", "iti-answer", "caa-from_prompt_end", "sadi-prompt_end", "iti-all"],
)
def test_batched_equals_one_at_a_time_under_an_editor(model, make, mode):
    editor = make().with_positions(mode)
    prompts = _prompts()
    base = _one_at_a_time(model, prompts)
    with editor.applied(model):
        expected = _one_at_a_time(model, prompts)
        got = generation.greedy_batch(model, prompts, NEW, batch_size=2)
    assert got == expected
    assert expected != base  # the edit changes the generations, so the test tells the paths apart


def test_batches_smaller_than_the_prompt_list_keep_the_prompts_order(model):
    prompts = _prompts()[::-1] + [PRIMER[:3]]  # one prompt shares only part of the primer
    expected = _one_at_a_time(model, prompts)
    for batch_size in (1, 2, 3, 16):
        assert generation.greedy_batch(model, prompts, NEW, batch_size=batch_size) == expected


def test_a_single_prompt_and_no_prompts(model):
    prompt = PRIMER + RESTS[1]
    assert generation.greedy_batch(model, [prompt], NEW) == [generation.greedy(model, prompt, NEW)]
    assert generation.greedy_batch(model, [[5]], NEW) == [generation.greedy(model, [5], NEW)]
    assert generation.greedy_batch(model, [], NEW) == []


def test_stop_ids_end_each_row_after_the_stop_token(model):
    prompts = _prompts()
    full = _one_at_a_time(model, prompts)
    stop = full[1][1]  # some row's second token: that row ends there, keeping it
    expected = [f[: f.index(stop) + 1] if stop in f else f for f in full]
    assert expected[1] == full[1][:2] and expected != full
    assert _one_at_a_time(model, prompts, stop_ids=[stop]) == expected
    assert generation.greedy_batch(model, prompts, NEW, stop_ids=[stop], batch_size=2) == expected


def test_stop_strings_end_each_row_at_the_token_completing_them(tiny_lm):
    lm = tiny_lm("llama-like")
    primer = lm.tokenizer("w1 w5 w9 w2 w30 w11", add_special_tokens=False)["input_ids"]
    rests = [lm.tokenizer(r, add_special_tokens=False)["input_ids"] for r in ("w3", "w7 w8", "w20 w21 w22")]
    prompts = [[lm.tokenizer.bos_token_id] + primer + rest for rest in rests]
    full = _one_at_a_time(lm, prompts, max_new_tokens=8)
    stop = lm.tokenizer.decode(full[0][2:4])  # spans two tokens: row 0 ends at its fourth token

    def cut(tokens):
        for k in range(1, len(tokens) + 1):
            if stop in lm.tokenizer.decode(tokens[:k]):
                return tokens[:k]
        return tokens

    expected = [cut(f) for f in full]
    assert len(expected[0]) <= 4 < len(full[0])
    options = {"stop_strings": ["never there", stop]}
    assert _one_at_a_time(lm, prompts, max_new_tokens=8, **options) == expected
    assert generation.greedy_batch(lm, prompts, 8, batch_size=2, **options) == expected
    assert generation.greedy_batch(lm, prompts, 8) == full


def test_context_length_and_arguments_are_checked(model):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generation.greedy_batch(model, [PRIMER, PRIMER * 2], 5)
    with pytest.raises(ValueError, match="at least one token"):
        generation.greedy_batch(model, [PRIMER, []], 5)
    with pytest.raises(ValueError, match="batch_size"):
        generation.greedy_batch(model, [PRIMER], 5, batch_size=0)


def test_progress_advances_once_per_prompt(model):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    generation.greedy_batch(model, _prompts(), NEW, batch_size=2, progress=bar)
    assert bar.n == len(RESTS)

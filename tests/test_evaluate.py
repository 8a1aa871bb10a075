"""Norm change against the unedited pass: what the Fig. 4 box plots and results.json report."""

import pytest
import torch

import hpr
from hpr.data.prompts import PromptFormat
from hpr.editors.caa import CAAEditor
from hpr.editors.hpr import HPREditor, LayerwiseHPR
from hpr.encoding import encode_all
from hpr.evaluate import edit_norm_change, norm_change_vs_base
from hpr.toyworld import toy_dataset

FMT = PromptFormat(primer="", separator="\n")


def _resid(model, questions, layer):
    """resid_post at ``layer`` at the true answer's tokens of each question, one whole sequence at a time."""
    out = []
    for e in encode_all(model, [(FMT.context(q), FMT.continuation(q.mc1[0].text)) for q in questions]):
        _, cache = model.run_with_cache(torch.tensor([e.tokens]), names_filter=f"blocks.{layer}.hook_resid_post")
        out.append(cache[f"blocks.{layer}.hook_resid_post"][0, -e.n_cont :])
    return out


def test_caa_norm_change_matches_a_hand_computation(tiny_toy):
    model = hpr.load_model("toy")
    questions = toy_dataset()[:6]
    d = model.cfg.d_model
    vector = torch.randn(d, generator=torch.Generator().manual_seed(0))
    editor = CAAEditor.from_vectors({1: vector}, 0.5, model.cfg.n_layers)
    change = norm_change_vs_base(model, questions, FMT, editor, batch_size=4)
    assert change[0] == 0.0  # before the edited layer nothing moves
    base = torch.cat(_resid(model, questions, 1))
    expected = ((base + 0.5 * vector).norm(dim=-1) - base.norm(dim=-1)).abs() / base.norm(dim=-1)
    assert change[1] == pytest.approx(expected.mean().item(), rel=1e-4)
    assert norm_change_vs_base(model, questions, FMT, None) == [0.0, 0.0]
    at_hook = edit_norm_change(model, questions, FMT, editor, batch_size=4)  # the edit's own hook: same here
    assert at_hook[0] == 0.0 and at_hook[1] == pytest.approx(expected.mean().item(), rel=1e-4)


def test_hpr_alone_preserves_the_norm_at_its_layer(tiny_toy):
    model = hpr.load_model("toy")
    torch.manual_seed(0)
    net = LayerwiseHPR(model.cfg.n_layers, model.cfg.d_model)
    editor = HPREditor.from_layerwise(net, (1,))
    change = norm_change_vs_base(model, toy_dataset()[:6], FMT, editor, batch_size=4)
    assert change[0] == 0.0 and change[1] < 1e-5


@pytest.mark.parametrize("edited", [False, True])
def test_scores_and_norms_from_one_pass_equal_the_two_passes_to_the_bit(tiny_toy, edited):
    from hpr.evaluate import answer_norms, predictions, predictions_and_norms
    from hpr.sources import prompt_format

    model = hpr.load_model("toy")
    questions = toy_dataset()[:11]  # batch 4: chunks of 4, 4 and 3 contexts
    fmt = prompt_format("toy")  # with its shared primer
    vector = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    editor = CAAEditor.from_vectors({1: vector}, 0.5, model.cfg.n_layers) if edited else None
    df, before, after = predictions_and_norms(model, questions, fmt, "m", editor, batch_size=4)
    apart = predictions(model, questions, fmt, "m", editor, batch_size=4)
    assert df.equals(apart) and df["loglik"].tolist() == apart["loglik"].tolist()
    before_apart, after_apart = answer_norms(model, questions, fmt, editor, batch_size=4)
    assert torch.equal(before, before_apart) and torch.equal(after, after_apart)
    assert not torch.equal(before, after) if edited else torch.equal(before, after)

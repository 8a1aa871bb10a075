"""Every editor behind one interface (parametrised), and the Diff, SEA and SADI edits in detail.

LoRA and representation tuning have their own files (test_lora.py, test_reptune.py)."""

import dataclasses
import math

import pytest
import torch

from hpr import positions
from hpr.data.prompts import PromptFormat
from hpr.editors import load_editor
from hpr.editors.caa import CAAEditor
from hpr.editors.diff import fit_diff
from hpr.editors.hpr import HPREditor, HPRTrainConfig, LayerwiseHPR
from hpr.editors.iti import ITIEditor
from hpr.editors.lora import LoRAConfig, LoRAEditor
from hpr.editors.reptune import RepTuneConfig, RepTuneEditor
from hpr.editors.sadi import fit_sadi, mean_differences, scale_masked, top_k_elements
from hpr.editors.sea import (
    SEAEditor,
    explained_rank,
    fit_sea,
    greedy_answers,
    last_layers,
    sea_activations,
    spectral_projections,
)


@pytest.fixture(scope="module")
def model(tiny_tl_model):
    return tiny_tl_model().eval()


def _acts(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shift = torch.randn(3, 32, generator=g)
    neg = torch.randn(n, 3, 32, generator=g)
    return neg + shift, neg, torch.randn(n, 3, 32, generator=g)  # pos, neg, base


def _diff():
    pos, neg, _ = _acts()
    return fit_diff(pos, neg, (1, 2), dataclasses.replace(HPRTrainConfig(), epochs=1))


def _sea():
    pos, neg, base = _acts()
    return fit_sea(base, pos, neg, (1, 2), k_ratio=0.9)


def _sadi(level):
    units = {"heads": 2, "hidden": 32, "neurons": 64}[level]
    mean_diff = torch.randn(3, units, generator=torch.Generator().manual_seed(1))
    mean_diff[0] = -10  # never the top: the first edited layer is 1 or 2
    return fit_sadi(mean_diff, k=3, delta=2.0, level=level, d_model=32)


def _hpr(no_angle=False):
    torch.manual_seed(0)
    return HPREditor.from_layerwise(LayerwiseHPR(3, 32), (1, 2), no_angle=no_angle)


def _iti():
    g = torch.Generator().manual_seed(0)
    return ITIEditor.from_heads({(1, 0): torch.randn(16, generator=g)}, {(1, 0): 0.5}, 3.0, n_layers=3, n_heads=2)


def _caa():
    return CAAEditor.from_vectors({1: torch.randn(32, generator=torch.Generator().manual_seed(0))}, 2.0, 3)


def _lora(tiny_tl_model):
    model = tiny_tl_model()  # the module's model: same seed, same weights
    editor = LoRAEditor.initialise(model, LoRAConfig(layers=(1, 2)), seed=0)
    g = torch.Generator().manual_seed(2)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.3 if k.endswith(".B") else v for k, v in editor.tensors.items()}
    return LoRAEditor(editor.config, tensors, 32, 3)


def _lora_zero(editor):
    tensors = {k: torch.zeros_like(v) if k.endswith(".B") else v for k, v in editor.tensors.items()}
    return LoRAEditor(editor.config, tensors, 32, 3)


def _reptune(tiny_tl_model, zero=False):
    model = tiny_tl_model()
    g = torch.Generator().manual_seed(3)
    tensors = {
        name: p.detach().clone() + (0 if zero else 0.2 * torch.randn(p.shape, generator=g))
        for name, p in model.named_parameters()
        if name in ("blocks.1.attn.W_V", "blocks.2.attn.W_O")
    }
    return RepTuneEditor(RepTuneConfig(layers=(1, 2)), tensors, 32, 3)


EDITORS = (
    "hpr",
    "hpr_no_angle",
    "iti",
    "caa",
    "diff",
    "lora",
    "reptune",
    "sea",
    "sadi_heads",
    "sadi_hidden",
    "sadi_neurons",
)


@pytest.fixture(scope="module")
def editors(tiny_tl_model):
    """name: (factory, the same editor at zero strength or with an empty selection), for each of EDITORS."""
    made = {
        "hpr": (_hpr, lambda e: e.with_strength(0.0)),  # the angle scale (ours: 0 = unedited)
        "hpr_no_angle": (lambda: _hpr(True), lambda e: e.with_strength(0.0)),
        "iti": (_iti, lambda e: e.with_strength(0.0)),
        "caa": (_caa, lambda e: e.with_strength(0.0)),
        "diff": (_diff, lambda e: e.with_strength(0.0)),
        "lora": (lambda: _lora(tiny_tl_model), _lora_zero),
        "reptune": (lambda: _reptune(tiny_tl_model), lambda e: _reptune(tiny_tl_model, zero=True)),
        "sea": (_sea, lambda e: SEAEditor(dataclasses.replace(e.config, layers=()), e.tensors, 32, 3)),
        "sadi_heads": (lambda: _sadi("heads"), lambda e: e.with_strength(0.0)),
        "sadi_hidden": (lambda: _sadi("hidden"), lambda e: e.with_strength(0.0)),
        "sadi_neurons": (lambda: _sadi("neurons"), lambda e: e.with_strength(0.0)),
    }
    assert sorted(made) == sorted(EDITORS)
    return made


def test_every_registered_method_is_in_the_shared_editor_tests(editors):
    """A new method file registers itself; this fails until the tests below cover its editor too."""
    from hpr.editors import REGISTRY, methods

    def covered(name):
        return [key for key in EDITORS if key == name or key.startswith(name + "_")]

    missing = [name for name in methods() if not covered(name)]
    assert not missing, f"registered methods with no entry in EDITORS: {missing}"
    for name in methods():
        for key in covered(name):
            assert isinstance(editors[key][0](), REGISTRY[name]), key  # the entry builds that method's editor


def _tokens(seed=1):
    return torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(seed))


def _first_layer(editor) -> int:
    config = editor.config
    if hasattr(config, "layers"):
        return min(config.layers)
    items = config.heads if hasattr(config, "heads") else config.elements
    return min(layer for layer, _ in items)


def _resid(model, tokens, editor=None):
    names = [f"blocks.{l}.hook_resid_post" for l in range(3)]
    if editor is None:
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    else:
        with editor.applied(model):
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return [cache[n] for n in names]


@pytest.fixture
def every_token_is_answer():
    """Direct model calls, with every position an answer token: each editor edits every position."""
    with positions.as_answer():
        yield


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_capability_is_exactly_the_base_at_zero_strength(name, model, editors):
    """KL(base || edited) is exactly 0 and perplexity exactly the base's for an editor that edits nothing; the
    editor itself moves both."""
    from hpr import capability

    make, zero = editors[name]
    editor = make()
    g = torch.Generator().manual_seed(5)
    encoded = [torch.randint(0, model.cfg.d_vocab, (n,), generator=g).tolist() for n in (12, 7, 9)]
    measured = capability.measure(model, encoded, {"edited": editor, "zero": zero(editor), "none": None})
    assert set(measured) == {"base", "edited", "zero"}  # None is the unedited model, measured once as base
    assert measured["zero"]["kl"] == 0.0 and measured["base"]["kl"] == 0.0
    assert measured["zero"]["perplexity"] == measured["base"]["perplexity"]
    assert measured["edited"]["kl"] > 0 and measured["edited"]["perplexity"] != measured["base"]["perplexity"]
    assert measured["base"]["tokens"] == 11 + 6 + 8  # every next-token prediction of every passage


@pytest.mark.parametrize("name", sorted(EDITORS))
def test_every_editor_obeys_the_interface(name, model, editors, tiny_tl_model, tmp_path, every_token_is_answer):
    make, zero = editors[name]
    editor = make()
    tokens = _tokens()
    base_logits = model(tokens)
    with editor.applied(model):
        edited_logits = model(tokens)
    assert not torch.allclose(edited_logits, base_logits, atol=1e-4), "the edit changes nothing"

    # layers before the first edited one are exactly the base model's
    first = _first_layer(editor)
    assert first >= 1
    base_resid, edit_resid = _resid(model, tokens), _resid(model, tokens, editor)
    for layer in range(first):
        assert torch.equal(base_resid[layer], edit_resid[layer])

    # zero strength / empty selection is exactly the base model
    with zero(editor).applied(model):
        assert torch.equal(model(tokens), base_logits)

    # save / load round trip through the registry
    editor.save(tmp_path / name)
    loaded = load_editor(tmp_path / name)
    assert type(loaded) is type(editor) and loaded.config == editor.config
    with loaded.applied(model):
        assert torch.equal(model(tokens), edited_logits)

    # nothing stays attached, even after an error inside the context
    with pytest.raises(RuntimeError, match="boom"):
        with editor.applied(model):
            raise RuntimeError("boom")
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    assert torch.equal(model(tokens), base_logits)

    # a model of another shape is refused before anything attaches
    other = tiny_tl_model(n_layers=2, d_model=48, d_head=24, d_mlp=96)
    with pytest.raises(ValueError, match="Fit a new editor|out of range"):
        with editor.applied(other):
            pass
    assert all(not hp.fwd_hooks for hp in other.hook_dict.values())


POSITION_EDITORS = sorted(n for n in EDITORS if n not in ("lora", "reptune"))  # weight edits act everywhere
CONTEXT = 6  # tokens 0-5 are the context (5 its end), 6-9 the answer


@pytest.mark.parametrize("mode", positions.MODES)
@pytest.mark.parametrize("name", POSITION_EDITORS)
def test_only_the_declared_positions_change(name, mode, model, editors):
    """Under a marked pass, every position before the first one a mode edits is bit-identical to the base
    model at every layer, and the edit does reach one it selects."""
    editor = editors[name][0]().with_positions(mode)
    tokens = torch.randint(0, 50, (8, 10), generator=torch.Generator().manual_seed(4))  # HPR: some negative side
    kinds = positions.whole_sequence_kinds([CONTEXT] * 8, [10] * 8, 10)
    with positions.marked(kinds):
        base, edited = _resid(model, tokens), _resid(model, tokens, editor)
    first_edited = {"all": 0, "answer": CONTEXT, "from_prompt_end": CONTEXT - 1, "prompt_end": CONTEXT - 1}[mode]
    for layer in range(3):
        assert torch.equal(edited[layer][:, :first_edited], base[layer][:, :first_edited])
    last = edited[2] - base[2]
    assert last[:, first_edited:].abs().max() > 1e-4
    if mode == "all":  # the context itself is edited
        assert last[:, : CONTEXT - 1].abs().max() > 1e-4


def test_editors_saved_before_positions_existed_load_as_editing_every_position(tmp_path):
    import json

    _iti().save(tmp_path / "iti")
    record = json.loads((tmp_path / "iti" / "config.json").read_text())
    assert record["config"]["positions"] == "answer"
    del record["config"]["positions"]
    (tmp_path / "iti" / "config.json").write_text(json.dumps(record))
    assert load_editor(tmp_path / "iti").positions == "all"


def test_an_unmarked_pass_is_refused_by_editors_that_edit_some_positions(model, tiny_tl_model):
    editor = _iti().with_positions("answer")
    with pytest.raises(RuntimeError, match="none marked"), editor.applied(model):
        model(_tokens())
    with editor.with_positions("all").applied(model):
        model(_tokens())  # "all" needs no marking
    with pytest.raises(ValueError, match="positions must be one of"):
        editor.with_positions("everywhere")
    with pytest.raises(ValueError, match="no positions setting"):
        _lora(tiny_tl_model).with_positions("answer")


# ------------------------------------------------------------------------------------------------- Diff


def test_diff_edit_is_h_plus_scaled_network_output():
    editor = _diff()
    h = torch.randn(5, 32)
    shift = editor.shift(1, h)
    assert torch.allclose(editor.edit(1, h), h + shift, atol=1e-6)
    assert torch.allclose(editor.with_strength(0.5).edit(1, h), h + 0.5 * shift, atol=1e-6)


def test_diff_learns_the_shift_to_the_positive_side():
    pos, neg, _ = _acts(n=256)
    before = fit_diff(pos, neg, (2,), dataclasses.replace(HPRTrainConfig(), epochs=0))
    after = fit_diff(pos, neg, (2,), dataclasses.replace(HPRTrainConfig(), epochs=20, lr=3e-3))

    def error(editor):
        return float(
            ((editor.edit(2, neg[:, 2]) - pos[:, 2]) ** 2).mean()
            + ((editor.edit(2, pos[:, 2]) - pos[:, 2]) ** 2).mean()
        )

    assert error(after) < 0.5 * error(before)


def test_diff_refuses_bad_input():
    pos, neg, _ = _acts()
    with pytest.raises(ValueError, match="layers in"):
        fit_diff(pos, neg, (3,), HPRTrainConfig())
    with pytest.raises(ValueError, match="same|both"):
        fit_diff(pos, neg[:, :2], (1,), HPRTrainConfig())


# -------------------------------------------------------------------------------------------------- SEA


def test_explained_rank_on_hand_cases():
    s = torch.tensor([3.0, 1.0, 0.0])  # energies 9, 1, 0: 0.9 then 1.0
    assert explained_rank(s, 0.9) == 1
    assert explained_rank(s, 0.95) == 2
    assert explained_rank(s, 1.0) == 2
    with pytest.raises(ValueError, match="k_ratio"):
        explained_rank(s, 0.0)


def test_sea_projections_are_orthonormal_and_follow_the_cutoff():
    pos, neg, base = (a[:, 0] for a in _acts(n=200))
    keep, tail = spectral_projections(base, pos, neg, k_ratio=0.998)
    assert torch.allclose(keep.T @ keep, torch.eye(keep.shape[1]), atol=1e-5)
    assert torch.allclose(tail.T @ tail, torch.eye(tail.shape[1]), atol=1e-5)
    keep_half, tail_half = spectral_projections(base, pos, neg, k_ratio=0.5)
    assert keep_half.shape[1] < keep.shape[1]  # fewer positive directions kept
    assert tail_half.shape[1] > tail.shape[1]  # fewer negative directions removed


def test_sea_edit_formula_and_norm():
    editor = _sea()
    h = torch.randn(4, 7, 32) * 5
    keep, tail = editor.projections(2)
    raw = h @ keep @ keep.T + h @ tail @ tail.T
    edited = editor.edit(2, h)
    assert torch.allclose(edited.norm(dim=-1), h.norm(dim=-1), rtol=1e-5)  # each token keeps its norm
    assert torch.allclose(edited, raw * (h.norm(dim=-1, keepdim=True) / raw.norm(dim=-1, keepdim=True)), atol=1e-4)
    average = SEAEditor(dataclasses.replace(editor.config, normalize="average"), editor.tensors, 32, 3)
    assert torch.allclose(average.edit(2, h), raw / 2, atol=1e-5)


def test_sea_with_full_cutoff_is_the_identity():
    pos, neg, base = _acts(n=200)
    # k_ratio 1: every positive direction kept (P+ = I) and every negative one removed (P- = 0)
    editor = fit_sea(base, pos, neg, (1,), k_ratio=1.0)
    keep, tail = editor.projections(1)
    assert keep.shape == (32, 32) and tail.shape == (32, 0)
    h = torch.randn(6, 32)
    assert torch.allclose(editor.edit(1, h), h, atol=1e-4)


def test_last_layers_matches_the_released_proportion():
    assert last_layers(32) == tuple(range(11, 32))  # the code's last 21 of 32
    assert last_layers(2) == (0, 1)
    assert last_layers(1) == (0,)


def test_sea_collects_greedy_base_answers_on_the_toy_world(tiny_toy):
    import hpr
    from hpr.toyworld import PRIMER, toy_dataset

    toy = hpr.load_model("toy", device="cpu")
    questions = toy_dataset()[:4]
    fmt = PromptFormat(primer=PRIMER, separator="\n")
    answers = greedy_answers(toy, questions, fmt, max_new_tokens=6)
    assert len(answers) == 4 and all(a.strip() and "\n" not in a for a in answers)
    base, pos, neg = sea_activations(toy, questions, fmt, max_new_tokens=6)
    n_pairs = sum(len(q.true_false_pairs()) for q in questions)
    assert base.shape == pos.shape == neg.shape == (n_pairs, toy.cfg.n_layers, toy.cfg.d_model)
    assert not torch.equal(pos, neg)


# ------------------------------------------------------------------------------------------------- SADI


@pytest.mark.parametrize("mode,factor", [("additive", 1 + 3.0), ("multiplicative", 3.0)])
def test_sadi_scales_only_the_masked_elements(mode, factor):
    a = torch.randn(2, 5, 8)
    out = scale_masked(a, torch.tensor([1, 6]), 3.0, mode, "hidden")
    assert torch.allclose(out[..., [1, 6]], a[..., [1, 6]] * factor)
    others = [i for i in range(8) if i not in (1, 6)]
    assert torch.equal(out[..., others], a[..., others])
    z = torch.randn(2, 5, 3, 4)  # heads: whole head vectors scaled
    out = scale_masked(z, torch.tensor([2]), 3.0, mode, "heads")
    assert torch.allclose(out[..., 2, :], z[..., 2, :] * factor)
    assert torch.equal(out[..., :2, :], z[..., :2, :])


def test_sadi_hook_edits_the_chosen_heads_at_every_position(model, every_token_is_answer):
    editor = _sadi("heads")
    tokens = _tokens()
    name = "blocks.{}.attn.hook_z"
    layer, head = editor.config.elements[0]
    _, base = model.run_with_cache(tokens, names_filter=lambda n: n == name.format(layer))
    seen = {}
    with editor.applied(model):  # the recorder attaches after the editor's hook, so it sees the edit
        with model.hooks(fwd_hooks=[(name.format(layer), lambda z, hook: seen.setdefault("z", z.clone()))]):
            model(tokens)
    z_base, z_edit = base[name.format(layer)], seen["z"]
    heads = [u for l, u in editor.config.elements if l == layer]
    assert torch.allclose(z_edit[:, :, heads], z_base[:, :, heads] * 3.0, atol=1e-5)  # additive, delta 2


def test_top_k_elements_are_the_largest_signed_differences():
    mean_diff = torch.tensor([[0.1, -5.0, 0.3], [2.0, 0.3, -0.2]])
    assert top_k_elements(mean_diff, 2) == ((0, 2), (1, 0))
    assert top_k_elements(mean_diff, 100) == tuple(sorted((l, u) for l in range(2) for u in range(3)))


@pytest.mark.parametrize("level,units", [("heads", "n_heads"), ("hidden", "d_model"), ("neurons", "d_mlp")])
def test_sadi_mean_differences_on_the_toy_world(tiny_toy, level, units):
    import hpr
    from hpr.toyworld import PRIMER, toy_dataset

    toy = hpr.load_model("toy", device="cpu")
    diff = mean_differences(toy, toy_dataset()[:6], PromptFormat(primer=PRIMER, separator="\n"), level)
    assert diff.shape == (toy.cfg.n_layers, getattr(toy.cfg, units))
    assert torch.isfinite(diff).all() and diff.abs().sum() > 0
    editor = fit_sadi(diff, k=2, delta=1.0, level=level, d_model=toy.cfg.d_model)
    assert len(editor.config.elements) == 2
    assert math.isclose(float(editor.tensors["mean_diff"].max()), float(diff.max()))

"""ITI and CAA editors: edit formulas at every position, head selection, save/load, shape checks, hooks."""

import numpy as np
import pytest
import torch

from hpr import generation, positions
from hpr.data.prompts import PromptFormat
from hpr.editors import load_editor
from hpr.editors.caa import CAAEditor, fit_caa
from hpr.editors.iti import ITI_PRESETS, ITIConfig, ITIEditor, answer_head_activations, fit_iti, top_k_heads

PLANT = torch.linspace(-1, 1, 8) / torch.linspace(-1, 1, 8).norm()  # the separating direction of head (1, 2)


@pytest.fixture(autouse=True)
def every_token_is_answer():
    """The edit formulas are checked at every position: direct model calls count every token as an answer
    (hpr.positions; the tests of which positions each mode edits are in test_methods.py)."""
    with positions.as_answer():
        yield


@pytest.fixture(scope="module")
def model(tiny_tl_model):
    return tiny_tl_model().eval()


@pytest.fixture
def toy(tiny_toy):
    import hpr

    return hpr.load_model("toy", device="cpu")


@pytest.fixture
def toy_heads(toy):
    """Answer-token head activations of the tiny toy world: (train, val) split by question."""
    from hpr.toyworld import PRIMER, toy_dataset

    questions = toy_dataset()
    fmt = PromptFormat(primer=PRIMER)
    cut = 2 * len(questions) // 3
    return answer_head_activations(toy, questions[:cut], fmt), answer_head_activations(toy, questions[cut:], fmt)


def _tokens(seed=1, shape=(2, 10)):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def _iti_editor(alpha=3.0):
    g = torch.Generator().manual_seed(0)
    directions = {(1, 0): torch.randn(16, generator=g), (2, 1): torch.randn(16, generator=g)}
    return ITIEditor.from_heads(directions, {(1, 0): 0.7, (2, 1): 1.3}, alpha, n_layers=3, n_heads=2)


def _caa_editor(layers=(1,), multiplier=2.5):
    g = torch.Generator().manual_seed(0)
    return CAAEditor.from_vectors({l: torch.randn(32, generator=g) for l in layers}, multiplier, n_layers=3)


def _synthetic_heads(n, seed):
    """z [n, 2 layers, 4 heads, 8]: noise everywhere, plus +-3 * PLANT at head (1, 2) by label."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, 4, 8, generator=g)
    y = torch.arange(n) % 2 == 0
    z[:, 1, 2] += torch.where(y[:, None], 3.0, -3.0) * PLANT
    return z, y


def _no_hooks(m):
    return all(not hp.fwd_hooks for hp in m.hook_dict.values())


# ----------------------------------------------------------------------------------------------- ITI


def test_iti_edit_is_alpha_sigma_theta_at_every_position_and_only_selected_heads(model):
    editor = _iti_editor(alpha=3.0)
    tokens = _tokens()
    names = [f"blocks.{l}.attn.hook_z" for l in range(3)]
    pre, post = {}, {}

    def grab(store):
        return [(n, lambda z, hook, s=store: s.__setitem__(hook.name, z.clone())) for n in names]

    _, base = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    with model.hooks(fwd_hooks=grab(pre)), editor.applied(model), model.hooks(fwd_hooks=grab(post)):
        model(tokens)
    assert torch.equal(post[names[0]], base[names[0]])  # no edited head in layer 0 (and none before)
    assert torch.equal(pre[names[1]], base[names[1]])
    for layer, head, other in [(1, 0, 1), (2, 1, 0)]:
        theta = editor.tensors[f"L{layer}.H{head}.direction"]
        sigma = editor.tensors[f"L{layer}.H{head}.sigma"]
        expected = pre[names[layer]][:, :, head] + 3.0 * sigma * theta  # broadcast over batch and every position
        torch.testing.assert_close(post[names[layer]][:, :, head], expected)
        assert torch.equal(post[names[layer]][:, :, other], pre[names[layer]][:, :, other])
    assert torch.isclose(theta.norm(), torch.tensor(1.0))


def test_fit_iti_picks_the_separable_head_and_a_false_to_true_direction():
    train, val = _synthetic_heads(200, seed=0), _synthetic_heads(100, seed=1)
    editor, val_acc = fit_iti(train, val, alpha=15.0, k=1)
    assert val_acc.shape == (2, 4)
    assert editor.config.heads == ((1, 2),) and editor.config.alpha == 15.0
    assert val_acc[1, 2] > 0.95 and np.delete(val_acc.ravel(), 6).max() < 0.8
    theta = editor.tensors["L1.H2.direction"]
    assert torch.isclose(theta.norm(), torch.tensor(1.0))
    assert torch.dot(theta, PLANT) > 0.95  # points from the false mean towards the true mean
    z_tr, y_tr = train
    torch.testing.assert_close(editor.tensors["L1.H2.sigma"], (z_tr[:, 1, 2] @ theta).std(correction=0))
    assert editor.head_shape == (4, 8) and editor.d_model == 32 and editor.n_layers == 2

    top3, _ = fit_iti(train, val, alpha=15.0, k=3)
    assert len(top3.config.heads) == 3 and (1, 2) in top3.config.heads
    assert top3.config.heads == top_k_heads(val_acc, 3)
    all_heads, _ = fit_iti(train, val, alpha=15.0, k=48)  # K capped at n_layers * n_heads
    assert len(all_heads.config.heads) == 8
    for l, h in all_heads.config.heads:  # every direction points from false to true
        diff = z_tr[y_tr][:, l, h].mean(0) - z_tr[~y_tr][:, l, h].mean(0)
        assert torch.dot(diff, all_heads.tensors[f"L{l}.H{h}.direction"]) > 0


def test_top_k_heads_ties_go_to_the_lower_layer_and_head():
    acc = np.array([[0.5, 0.7], [0.7, 0.6]])
    assert top_k_heads(acc, 1) == ((0, 1),)
    assert top_k_heads(acc, 3) == ((0, 1), (1, 0), (1, 1))
    assert top_k_heads(acc, 99) == ((0, 0), (0, 1), (1, 0), (1, 1))
    with pytest.raises(ValueError, match="k must be"):
        top_k_heads(acc, 0)


def test_fit_iti_needs_both_labels_in_train():
    z, y = _synthetic_heads(20, seed=0)
    with pytest.raises(ValueError, match="both true and false"):
        fit_iti((z, torch.ones_like(y)), (z, y), alpha=1.0)


def test_answer_head_activations_are_the_answer_tokens_of_every_choice(toy):
    from hpr.scoring import encode_all
    from hpr.toyworld import PRIMER, toy_dataset

    questions = toy_dataset()[:3]
    fmt = PromptFormat(primer=PRIMER)
    z, is_true = answer_head_activations(toy, questions, fmt, batch_size=4, features="answer_tokens")
    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in questions for c in q.mc2]
    encoded = encode_all(toy, pairs)
    labels = [c.is_true for q in questions for c in q.mc2]
    assert z.shape == (sum(e.n_cont for e in encoded), toy.cfg.n_layers, toy.cfg.n_heads, toy.cfg.d_head)
    assert is_true.tolist() == [t for e, t in zip(encoded, labels, strict=True) for _ in range(e.n_cont)]
    e = encoded[-1]  # the last choice, run alone (no padding) gives the same head outputs
    _, cache = toy.run_with_cache(torch.tensor([e.tokens]), names_filter=lambda n: n.endswith("attn.hook_z"))
    alone = torch.stack([cache[f"blocks.{l}.attn.hook_z"][0, -e.n_cont :] for l in range(toy.cfg.n_layers)], dim=1)
    assert z.dtype == torch.float16  # as honest_llama's activations
    torch.testing.assert_close(z[-e.n_cont :].float(), alone, rtol=1e-3, atol=1e-3)


def test_iti_features_are_the_last_token_of_each_answer_by_default(toy):
    """honest_llama's features: one row per (question, answer), at its last token."""
    from hpr.scoring import encode_all
    from hpr.toyworld import PRIMER, toy_dataset

    questions = toy_dataset()[:3]
    fmt = PromptFormat(primer=PRIMER)
    last, last_true = answer_head_activations(toy, questions, fmt, batch_size=4)
    tokens, _ = answer_head_activations(toy, questions, fmt, batch_size=3, features="answer_tokens")
    encoded = encode_all(toy, [(fmt.context(q), fmt.continuation(c.text)) for q in questions for c in q.mc2])
    ends = torch.tensor([e.n_cont for e in encoded]).cumsum(0) - 1
    assert len(last) == len(encoded) == sum(len(q.mc2) for q in questions)
    assert last_true.tolist() == [c.is_true for q in questions for c in q.mc2]
    torch.testing.assert_close(last.float(), tokens[ends].float(), rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="ITI features"):
        answer_head_activations(toy, questions, fmt, features="mean")


def test_fitted_toy_editor_alpha_zero_is_a_no_op_and_save_load_reproduces_logits(toy, toy_heads, tmp_path):
    editor, val_acc = fit_iti(*toy_heads, alpha=ITI_PRESETS["iti15"], k=2)
    assert val_acc.shape == (toy.cfg.n_layers, toy.cfg.n_heads) and len(editor.config.heads) == 2
    tokens = torch.tensor([[1, 5, 9, 14, 20, 3]])
    base = toy(tokens)
    with editor.with_strength(0.0).applied(toy):
        torch.testing.assert_close(toy(tokens), base, rtol=0, atol=0)
    with editor.applied(toy):
        edited = toy(tokens)
    assert not torch.equal(edited, base)

    editor.save(tmp_path / "iti")
    loaded = load_editor(tmp_path / "iti")
    assert isinstance(loaded, ITIEditor) and loaded.config == editor.config
    assert loaded.tensors.keys() == editor.tensors.keys()
    with loaded.applied(toy):
        torch.testing.assert_close(toy(tokens), edited, rtol=0, atol=0)
    assert _no_hooks(toy)


def test_iti_generation_shifts_only_the_newest_position_of_each_pass(toy, toy_heads):
    """honest_llama's generation: the prefill's last token, then each new token; the prompt stays unedited."""
    editor, _ = fit_iti(*toy_heads, alpha=ITI_PRESETS["iti200"], k=2)
    layer, head = editor.config.heads[0]
    name = f"blocks.{layer}.attn.hook_z"
    prompt = toy.to_tokens("Q: pet and city of X?\nA:")[0].tolist()

    def record(store):
        return [(name, lambda z, hook: store.append(z[0, :, head].clone()))]

    pre, post = [], []
    with toy.hooks(fwd_hooks=record(pre)), editor.applied(toy), toy.hooks(fwd_hooks=record(post)):
        new = generation.greedy(toy, prompt, max_new_tokens=4)
    assert len(pre) == len(post) == len(new)  # the prefill, then one pass per token fed back
    assert pre[0].shape[0] == len(prompt) and all(p.shape[0] == 1 for p in pre[1:])
    shift = editor.shifts(layer)[1][0]
    for before, after in zip(pre, post, strict=True):
        assert torch.equal(after[:-1], before[:-1])
        torch.testing.assert_close(after[-1], before[-1] + shift, rtol=0, atol=1e-5)
    with editor.with_strength(0.0).applied(toy):
        assert generation.greedy(toy, prompt, max_new_tokens=4) == generation.greedy(toy, prompt, max_new_tokens=4)
    base = toy.generate(
        torch.tensor([prompt]),
        max_new_tokens=4,
        do_sample=False,
        verbose=False,
        stop_at_eos=False,
        use_past_kv_cache=True,
    )[0, len(prompt) :].tolist()
    assert generation.greedy(toy, prompt, max_new_tokens=4) == base  # unedited: TransformerLens's own greedy
    assert _no_hooks(toy)


def test_iti_refuses_a_model_with_other_head_shapes(tiny_tl_model):
    other = tiny_tl_model(n_heads=4, d_head=8)  # same d_model
    with pytest.raises(ValueError, match=r"n_heads=2, d_head=16.*n_heads=4, d_head=8"), _iti_editor().applied(other):
        pass
    assert _no_hooks(other)


def test_iti_config_validation():
    assert ITIConfig(heads=[[1, 0], [0, 1]], alpha=1).heads == ((1, 0), (0, 1))  # JSON-style lists normalised
    with pytest.raises(ValueError, match="duplicates"):
        ITIConfig(heads=((0, 1), (0, 1)))
    with pytest.raises(ValueError, match=r"\(layer, head\) pairs"):
        ITIConfig(heads=((0,),))
    with pytest.raises(ValueError, match="norm"):
        ITIEditor.from_heads({(0, 0): torch.zeros(4)}, {(0, 0): 1.0}, 1.0, n_layers=1, n_heads=1)


# ----------------------------------------------------------------------------------------------- CAA


def test_fit_caa_is_the_unnormalised_mean_difference():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(40, 3, 32, generator=g) + 1.0, torch.randn(40, 3, 32, generator=g)
    editor = fit_caa(pos, neg, layers=(2, 0), multiplier=4.0)
    assert editor.config.layers == (0, 2) and editor.config.multiplier == 4.0
    assert (editor.d_model, editor.n_layers) == (32, 3)
    for l in (0, 2):
        torch.testing.assert_close(editor.tensors[f"layer{l}.vector"], pos[:, l].mean(0) - neg[:, l].mean(0))
    with pytest.raises(ValueError, match="out of range"):
        fit_caa(pos, neg, layers=(3,), multiplier=1.0)


def test_caa_edit_adds_multiplier_times_vector_at_every_position(model):
    editor = _caa_editor(layers=(1,), multiplier=2.5)
    tokens = _tokens()
    names = [f"blocks.{l}.hook_resid_post" for l in range(3)]
    _, base = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    with editor.applied(model):
        _, edited = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert torch.equal(edited[names[0]], base[names[0]])
    torch.testing.assert_close(edited[names[1]], base[names[1]] + 2.5 * editor.tensors["layer1.vector"])
    assert not torch.allclose(edited[names[2]], base[names[2]])


def test_caa_save_load_round_trip(model, tmp_path):
    editor = _caa_editor(layers=(0, 2), multiplier=-1.5)
    editor.save(tmp_path / "caa")
    loaded = load_editor(tmp_path / "caa")
    assert isinstance(loaded, CAAEditor) and loaded.config == editor.config
    tokens = _tokens(2, (2, 8))
    with editor.applied(model):
        a = model(tokens)
    with loaded.applied(model):
        b = model(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_caa_fits_from_collected_answer_activations(toy, tmp_path):
    from hpr.activations import collect
    from hpr.toyworld import PRIMER, toy_dataset

    acts = collect(toy, toy_dataset()[:6], PromptFormat(primer=PRIMER), tmp_path / "acts")
    pos, neg, _ = acts.token_pairs()
    editor = fit_caa(pos, neg, layers=(1,), multiplier=1.0)
    assert editor.tensors["layer1.vector"].shape == (toy.cfg.d_model,)
    tokens = torch.tensor([[1, 5, 9, 14]])
    base = toy(tokens)
    with editor.with_strength(0.0).applied(toy):
        torch.testing.assert_close(toy(tokens), base, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("make", [_iti_editor, _caa_editor], ids=["iti", "caa"])
def test_no_hooks_left_after_exit_or_error(model, make):
    editor = make()
    tokens = _tokens(3, (1, 6))
    base = model(tokens)
    with editor.applied(model):
        assert not torch.equal(model(tokens), base)
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"), editor.applied(model):
        raise RuntimeError("boom")
    assert _no_hooks(model)
    torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)


def test_caa_sweeps_score_each_distinct_editor_once(tiny_toy, tmp_path, monkeypatch):
    """The layer sweep scores every layer at x1; the multiplier sweep then reuses the chosen layer's x1 row."""
    import json

    from hpr.cli import main
    from hpr.runs.pipeline import Pipeline

    calls = []
    val_mc = Pipeline.val_mc

    def counted(self, label, editor):
        calls.append(label)
        return val_mc(self, label, editor)

    monkeypatch.setattr(Pipeline, "val_mc", counted)
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--quiet", "--methods", "base,caa"]) == 0
    layers = json.loads((tmp_path / "run" / "caa_layer_sweep.json").read_text())
    sweep = json.loads((tmp_path / "run" / "caa_sweep.json").read_text())
    assert len(layers["val"]) == 2 and len(sweep["val"]) == 6
    assert calls == ["caa"] * (2 + 6 - 1)
    again = next(row for row in sweep["val"] if row["multiplier"] == 1.0)
    assert {k: again[k] for k in ("mc1", "mc2")} == {k: layers["chosen"][k] for k in ("mc1", "mc2")}

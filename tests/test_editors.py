"""HPR editor: hook hygiene, the edit formula at the hooked layers, save/load, shape checks."""

import dataclasses

import pytest
import torch

from hpr import ops
from hpr.editors import load_editor
from hpr.editors.hpr import HPREditor, HPRTrainConfig, LayerwiseHPR, fit_layerwise, probe_accuracy, top_k_layers


@pytest.fixture(scope="module")
def model(tiny_tl_model):
    return tiny_tl_model().eval()


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return LayerwiseHPR(n_layers=3, d_model=32)


def _resid(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    return [cache[f"blocks.{l}.hook_resid_post"] for l in range(3)]


@pytest.mark.parametrize("no_angle", [False, True])
def test_edit_formula_at_hooked_layer_and_untouched_before(model, net, no_angle):
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    editor = HPREditor.from_layerwise(net, (1,), no_angle=no_angle)
    base = _resid(model, tokens)
    captured = {}
    with editor.applied(model):
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda a, hook: captured.setdefault("out", a))]):
            edited = _resid(model, tokens)
    assert torch.equal(edited[0], base[0])  # layers before the edit are exactly the base
    w = net.probe[1].detach()
    theta = None if no_angle else net.theta(base[1].reshape(1, -1, 32).expand(3, -1, -1))[1].detach().reshape(2, 10)
    expected = ops.hpr_edit(base[1], w, theta)
    torch.testing.assert_close(captured["out"], expected)
    assert ops.relative_norm_change(captured["out"], base[1]).max() < 1e-5
    assert not torch.equal(edited[2], base[2])  # the edit propagates downstream


def test_no_hooks_left_after_exit_or_error(model, net):
    editor = HPREditor.from_layerwise(net, (0, 2))
    tokens = torch.randint(0, 50, (1, 6))
    base = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with editor.applied(model):
            assert not torch.equal(model(tokens), base)
            raise RuntimeError("boom")
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())
    torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)


def test_save_load_round_trip(model, net, tmp_path):
    editor = HPREditor.from_layerwise(net, (0, 2))
    editor.save(tmp_path / "hpr")
    loaded = load_editor(tmp_path / "hpr")
    assert isinstance(loaded, HPREditor) and loaded.config == editor.config
    tokens = torch.randint(0, 50, (2, 8))
    with editor.applied(model):
        a = model(tokens)
    with loaded.applied(model):
        b = model(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_wrong_model_shape_is_refused_before_hooks_attach(net, tiny_tl_model):
    other = tiny_tl_model(d_model=64, d_head=32)
    editor = HPREditor.from_layerwise(net, (0,))
    with pytest.raises(ValueError, match="d_model=32"):
        with editor.applied(other):
            pass
    assert all(not hp.fwd_hooks for hp in other.hook_dict.values())


def test_load_editor_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no editor"):
        load_editor(tmp_path)
    (tmp_path / "config.json").write_text('{"method": "nope", "config": {}}')
    with pytest.raises(ValueError, match="unknown editor method 'nope'"):
        load_editor(tmp_path)


def test_training_separates_a_planted_direction():
    """Probes trained jointly over layers find a planted truth direction; angle targets are learned."""
    g = torch.Generator().manual_seed(0)
    n, layers, d = 512, 2, 32
    direction = torch.randn(d, generator=g)
    base = torch.randn(n, layers, d, generator=g) * 2
    pos, neg = base + direction, base - direction
    net = fit_layerwise(pos, neg, HPRTrainConfig(epochs=5, lr=5e-3))
    acc = probe_accuracy(net.probe.detach(), pos, neg)
    assert min(acc) > 0.9
    assert top_k_layers([0.5, 0.9, 0.7], 2) == (1, 2)
    with torch.no_grad():
        theta_pos = net.theta(pos.transpose(0, 1)).mean()
        theta_neg = net.theta(neg.transpose(0, 1)).mean()
    assert theta_neg > theta_pos  # negatives need rotating, positives (target 0) do not


def _planted(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(32, generator=g)
    base = torch.randn(n, 2, 32, generator=g) * 2
    return base + direction, base - direction


def test_the_epoch_kept_is_the_first_with_the_best_validation_score():
    pos, neg = _planted()
    scripted, probes = iter([0.5, 0.9, 0.7, 0.9]), []

    def score_epoch(net):  # what the run passes: pooled val probe accuracy; scripted here
        probes.append(net.probe.detach().clone())
        return next(scripted)

    cfg = HPRTrainConfig(epochs=4, lr=5e-3)
    net = fit_layerwise(pos, neg, cfg, score_epoch=score_epoch)
    assert len(probes) == 4 and not torch.equal(probes[1], probes[3])
    assert torch.equal(net.probe.detach(), probes[1])  # epoch 2: the best, and before the tie at epoch 4
    last = fit_layerwise(pos, neg, dataclasses.replace(cfg, select_epoch="last"), score_epoch=score_epoch)
    assert len(probes) == 4 and torch.equal(last.probe.detach(), probes[3])  # not scored; the last epoch kept
    with pytest.raises(ValueError, match="select_epoch"):
        HPRTrainConfig(select_epoch="best")


def test_the_seed_decides_initialisation_and_batch_order():
    pos, neg = _planted()

    def probe(seed):
        return fit_layerwise(pos, neg, HPRTrainConfig(epochs=1, seed=seed)).probe.detach()

    assert torch.equal(probe(1), probe(1))
    assert not torch.equal(probe(1), probe(2))


def test_generation_with_and_without_kv_cache_agree_under_the_edit(tiny_toy):
    """Every position is edited as it is computed, so cached and uncached greedy decoding agree."""
    import hpr

    toy = hpr.load_model("toy", device="cpu")
    torch.manual_seed(0)
    editor = HPREditor.from_layerwise(LayerwiseHPR(toy.cfg.n_layers, toy.cfg.d_model), (0, 1))
    prompt = toy.to_tokens("Q: pet and city of X?\nA:")
    kwargs = dict(max_new_tokens=6, do_sample=False, verbose=False, return_type="tokens", stop_at_eos=False)
    base = toy.generate(prompt, **kwargs)
    with editor.applied(toy):
        cached = toy.generate(prompt, use_past_kv_cache=True, **kwargs)
        uncached = toy.generate(prompt, use_past_kv_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert cached.shape == base.shape
    assert all(not hp.fwd_hooks for hp in toy.hook_dict.values())


def test_an_editor_defines_edit_or_edit_fn_and_either_serves_both():
    from hpr.editors.base import Editor

    class Plain(Editor):
        method = "plain"

        def edit(self, layer, h):
            return h * 2

    class Prepared(Editor):
        method = "prepared"

        def edit_fn(self, layer, device):
            return lambda h: h + 1

    class Neither(Editor):
        method = "neither"

    h = torch.ones(3)
    for cls, expected in ((Plain, 2.0), (Prepared, 2.0)):
        editor = cls(None, {}, 3, 1)
        assert torch.equal(editor.edit(0, h), torch.full((3,), expected))
        assert torch.equal(editor.prepared_edit(0, "cpu")(h), torch.full((3,), expected))
    with pytest.raises(NotImplementedError, match="edits through its hooks only"):
        Neither(None, {}, 3, 1).edit(0, h)  # an error, not an endless recursion
    with pytest.raises(NotImplementedError, match="edits through its hooks only"):
        Neither(None, {}, 3, 1).prepared_edit(0, "cpu")


@pytest.mark.parametrize("no_angle", [False, True])
def test_the_angle_scale_scales_the_rotation_and_keeps_the_norm(net, no_angle):
    """Our strength axis for HPR: angle_scale s rotates each negative-side token by s * theta (s * gamma for the
    ablation), towards its reflection, norm kept; positive-side tokens are untouched."""
    h = torch.randn(200, 32, generator=torch.Generator().manual_seed(4))
    full = HPREditor.from_layerwise(net, (1,), no_angle=no_angle)
    half = full.with_strength(0.5)
    assert half.config.angle_scale == 0.5 and full.config.angle_scale == 1.0
    negative = ops.negative_side(h, net.probe[1].detach())
    assert 0 < negative.sum() < len(h)
    full_angle = ops.vector_angle(full.edit(1, h), h)[negative]
    half_angle = ops.vector_angle(half.edit(1, h), h)[negative]
    assert torch.allclose(half_angle, 0.5 * full_angle, atol=1e-4)
    assert torch.allclose(half.edit(1, h).norm(dim=-1), h.norm(dim=-1), rtol=1e-5)
    assert torch.equal(half.edit(1, h)[~negative], h[~negative])
    with pytest.raises(ValueError, match="angle_scale must be a finite number >= 0"):
        full.with_strength(float("nan"))

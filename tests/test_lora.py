"""LoRA editor: the hooked adapter equals the dense model with W_t + (alpha/rank) A @ B, B = 0 is the base model,
untouched layers stay exact, save/load, shape checks, hooks, KV-cache generation, and training."""

import copy

import pytest
import torch

from hpr.data.prompts import PromptFormat
from hpr.editors import load_editor
from hpr.editors.lora import LoRAConfig, LoRAEditor, LoRATrainConfig, fit_lora, true_answer_loss

VARIANTS = {  # name: (changes to the tiny_tl_model config, targets); every ln1 gets non-trivial weights (see _model)
    "ln": ({}, ("q", "v")),
    "rms-rotary-gqa": (
        {"normalization_type": "RMS", "positional_embedding_type": "rotary", "rotary_dim": 16, "n_key_value_heads": 1},
        ("q", "k", "v"),
    ),
    "lnpre": ({"normalization_type": "LNPre"}, ("q", "v")),
    "no-norm": ({"normalization_type": None}, ("k", "v")),
}


def _model(tiny_tl_model, **changes):
    model = tiny_tl_model(**changes).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # LN weights of 1 and biases of 0 would hide a missing affine map in the captured input
        for name, p in model.named_parameters():
            if ".ln1." in name or ".b_" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def model(tiny_tl_model):
    return _model(tiny_tl_model)


@pytest.fixture
def toy(tiny_toy):
    import hpr

    return hpr.load_model("toy", device="cpu")


def _tokens(seed=1, shape=(2, 10)):
    return torch.randint(0, 50, shape, generator=torch.Generator().manual_seed(seed))


def _editor(model, layers=(1, 2), targets=("q", "v"), rank=4, alpha=8.0, b_scale=0.3, seed=0):
    """Initialised adapters with a random nonzero B (an untrained one, B = 0, would be the identity)."""
    editor = LoRAEditor.initialise(model, LoRAConfig(layers=layers, rank=rank, alpha=alpha, targets=targets), seed)
    g = torch.Generator().manual_seed(seed + 1)
    for key, value in editor.tensors.items():
        if key.endswith(".B"):
            editor.tensors[key] = b_scale * torch.randn(value.shape, generator=g)
    return editor


def _no_hooks(m):
    return all(not hp.fwd_hooks for hp in m.hook_dict.values())


# ------------------------------------------------------------------------------------------ the formula


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hooked_adapter_equals_the_dense_model_with_updated_weights(variant, tiny_tl_model):
    changes, targets = VARIANTS[variant]
    model = _model(tiny_tl_model, **changes)
    editor = _editor(model, layers=(0, 2), targets=targets)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for layer in (0, 2):
            attn = dense.blocks[layer].attn
            for t in targets:
                a, b = editor.tensors[f"layer{layer}.{t}.A"], editor.tensors[f"layer{layer}.{t}.B"]
                name = f"_W_{t.upper()}" if hasattr(attn, f"_W_{t.upper()}") else f"W_{t.upper()}"  # GQA: raw k/v
                weight = getattr(attn, name)  # [n_heads_t, d_model, d_head]
                delta = (8.0 / 4) * torch.einsum("dr,rhe->hde", a, b.view(4, weight.shape[0], 16))
                torch.testing.assert_close(editor.weight_delta(layer, t), delta)
                weight.add_(delta)
    tokens = _tokens()
    base = model(tokens)
    with editor.applied(model):
        edited = model(tokens)
    assert (edited - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(edited, dense(tokens), atol=1e-5, rtol=1e-5)
    assert _no_hooks(model)


def test_untrained_adapter_is_exactly_the_base_model(model):
    editor = LoRAEditor.initialise(model, LoRAConfig(layers=(0, 1, 2), targets=("q", "k", "v")), seed=3)
    assert all(not v.any() for k, v in editor.tensors.items() if k.endswith(".B"))
    assert all(v.abs().max() > 0 for k, v in editor.tensors.items() if k.endswith(".A"))
    tokens = _tokens()
    base = model(tokens)
    with editor.applied(model):
        assert torch.equal(model(tokens), base)


def test_layers_before_the_first_edited_layer_are_exactly_the_base(model):
    editor = _editor(model, layers=(1, 2))
    names = [f"blocks.{l}.hook_resid_post" for l in range(3)]
    tokens = _tokens()
    _, base = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    with editor.applied(model):
        _, edited = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert torch.equal(edited[names[0]], base[names[0]])
    assert not torch.allclose(edited[names[1]], base[names[1]])


# ------------------------------------------------------------------------------- data, shapes, hooks


def test_save_load_round_trip_gives_identical_logits(model, tmp_path):
    editor = _editor(model, layers=(2, 0), targets=["v", "q"])  # lists, unsorted: normalised
    assert editor.config.layers == (0, 2) and editor.config.targets == ("q", "v")
    editor.save(tmp_path / "lora")
    loaded = load_editor(tmp_path / "lora")
    assert isinstance(loaded, LoRAEditor) and loaded.config == editor.config
    assert loaded.tensors.keys() == editor.tensors.keys()
    assert loaded.tensors["layer2.q.A"].shape == (32, 4) and loaded.tensors["layer2.v.B"].shape == (4, 32)
    tokens = _tokens(2, (2, 8))
    with editor.applied(model):
        a = model(tokens)
    with loaded.applied(model):
        b = model(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_hooks_left_after_exit_or_error(model):
    editor = _editor(model)
    tokens = _tokens(3, (1, 6))
    base = model(tokens)
    with pytest.raises(RuntimeError, match="boom"), editor.applied(model):
        assert not torch.equal(model(tokens), base)
        raise RuntimeError("boom")
    assert _no_hooks(model)
    torch.testing.assert_close(model(tokens), base, rtol=0, atol=0)


@pytest.mark.parametrize(
    "other, message",
    [
        ({"n_heads": 4, "d_head": 8}, r"n_heads=2, d_head=16.*n_heads=4, d_head=8"),
        ({"d_model": 48, "d_head": 24}, r"d_model=32.*d_model=48"),
        ({"n_layers": 2}, r"n_layers=3.*n_layers=2"),
        ({"n_key_value_heads": 1}, r"layer1\.v has A \(32, 4\) and B \(4, 32\).*B \(4, 16\)"),
        ({"use_split_qkv_input": True}, r"cannot adapt this model: use_split_qkv_input"),
    ],
)
def test_a_model_of_another_shape_or_attention_input_is_refused(model, tiny_tl_model, other, message):
    editor = _editor(model)
    other_model = tiny_tl_model(**other)
    with pytest.raises(ValueError, match=message), editor.applied(other_model):
        pass
    assert _no_hooks(other_model)


def test_config_validation(tiny_tl_model):
    assert LoRAConfig(layers=[1, 0], rank=2.0, alpha=4).layers == (0, 1)
    assert LoRAConfig(layers=(0,), targets="v").targets == ("v",)
    assert LoRAConfig(layers=(0,), rank=4, alpha=8.0).scale == 2.0
    for bad in [
        dict(layers=(0, 0)),
        dict(layers=(-1,)),
        dict(layers=(0,), rank=0),
        dict(layers=(0,), targets=("q", "o")),
        dict(layers=(0,), targets=()),
    ]:
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)
    assert LoRATrainConfig(targets=["v", "q"]).targets == ("q", "v")
    with pytest.raises(ValueError, match="targets"):
        LoRATrainConfig(targets=("x",))
    with pytest.raises(ValueError, match="epochs"):
        LoRATrainConfig(epochs=0)
    model = tiny_tl_model()
    with pytest.raises(ValueError, match="out of range"):
        LoRAEditor.initialise(model, LoRAConfig(layers=(3,)))
    with pytest.raises(ValueError, match="at least one layer"):
        LoRAEditor.initialise(model, LoRAConfig())


# ---------------------------------------------------------------------------- toy: generation, training


def test_cached_and_uncached_generation_agree_under_the_edit(toy):
    editor = _editor(toy, layers=(0, 1), targets=("q", "k", "v"), b_scale=1.0)
    prompt = toy.to_tokens("Q: pet and city of X?\nA:")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "verbose": False, "return_type": "tokens", "stop_at_eos": False}
    with torch.no_grad(), editor.applied(toy):
        cached = toy.generate(prompt, use_past_kv_cache=True, **kwargs)
        uncached = toy.generate(prompt, use_past_kv_cache=False, **kwargs)
        logits = toy(uncached)
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        assert not torch.allclose(logits, toy(uncached))  # the edit was on
    assert _no_hooks(toy)


def test_fit_lora_lowers_the_true_answer_loss_and_leaves_the_model_unchanged(toy):
    from hpr.toyworld import PRIMER, toy_dataset

    questions = toy_dataset()
    fmt = PromptFormat(primer=PRIMER, separator="\n")
    toy.blocks[0].attn.W_Q.requires_grad_(False)  # a mixed state, to see that it is restored as it was
    flags = {n: p.requires_grad for n, p in toy.named_parameters()}
    state = {k: v.clone() for k, v in toy.state_dict().items()}
    base_loss = true_answer_loss(toy, questions, fmt)

    cfg = LoRATrainConfig(epochs=4, lr=1e-2, batch_size=8, seed=1)
    editor = fit_lora(toy, questions, fmt, layers=(0, 1), cfg=cfg, batch_size=3)
    assert editor.config == LoRAConfig(layers=(0, 1), rank=8, alpha=16.0, targets=("q", "v"))
    assert all(
        v.any() and not v.requires_grad and v.device.type == "cpu"
        for k, v in editor.tensors.items()
        if k.endswith(".B")
    )
    assert true_answer_loss(toy, questions, fmt, editor) < base_loss - 0.5  # measured 5.62 -> 4.58

    assert {n: p.requires_grad for n, p in toy.named_parameters()} == flags
    assert all(p.grad is None for p in toy.parameters())
    assert all(torch.equal(v, state[k]) for k, v in toy.state_dict().items())
    assert _no_hooks(toy)

    # The forward-pass chunk size only bounds memory: one chunk per step trains the same adapters.
    whole = fit_lora(toy, questions, fmt, layers=(0, 1), cfg=cfg, batch_size=8)
    for k, v in editor.tensors.items():
        torch.testing.assert_close(whole.tensors[k], v, atol=1e-4, rtol=1e-4)

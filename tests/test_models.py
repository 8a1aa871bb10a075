"""hpr.models: offline loading of local HF checkpoints into an unprocessed HookedTransformer.

Tiny randomly initialised checkpoints of every supported architecture are written to disk with a
tokenizer built in memory, so nothing here needs network access or downloaded weights.
"""

import re

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    FalconConfig,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hpr import ops
from hpr.editors import load_editor
from hpr.editors.hpr import HPREditor, LayerwiseHPR
from hpr.models import (
    BOS_MODEL_TYPES,
    SUPPORTED_MODEL_TYPES,
    _resolve_dtype,
    head_z_hook,
    model_dtype,
    resid_post_hook,
)
from hpr.sources import load_model

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
WORDS = SPECIALS + [f"w{i}" for i in range(60)]
VOCAB = len(WORDS)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _perturb(hf_model) -> None:
    """Non-trivial norm weights and biases (HF initialises them to 1 and 0), so that folding,
    centering, or dropping a bias (Qwen2's q/k/v, GPT-NeoX's) would be detectable."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "ln" in name or "norm" in name or name.endswith(".bias"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _save(hf_model, path):
    _perturb(hf_model)
    hf_model.eval()
    hf_model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return hf_model


_DECODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    vocab_size=VOCAB,
    **IDS,
)
# One tiny model per architecture. Each sets what its family adds to a plain decoder to values
# that change the log-probabilities by far more than the tolerance, so a conversion that ignored
# it would fail test_logprobs_match_hf (test_architecture_features checks that they are there).
ARCHS = {
    # n_inner != 4 * n_embd: TL assumes 4x, hpr.models must take the real width.
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=96, n_positions=128, vocab_size=VOCAB, **IDS)
    ),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **_DECODER)),  # GQA
    # Tied input and output embeddings, like SmolLM2: the checkpoint has no lm_head.weight.
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **_DECODER)),
    # A window shorter than the 9 test tokens.
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=4, **_DECODER)),
    # q/k/v biases (perturbed by _perturb).
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, **_DECODER)),
    # head_dim != hidden/heads, scores scaled by query_pre_attn_scalar, caps low enough to bite on
    # a random model, sliding/global layers, tied embeddings (Gemma 2's default). Eager attention:
    # HF's sdpa refuses attention soft-capping.
    "gemma2": lambda: Gemma2ForCausalLM(
        Gemma2Config(
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=4,
            attn_logit_softcapping=0.05,
            final_logit_softcapping=1.0,
            attn_implementation="eager",
            **_DECODER,
        )
    ),
    # Gemma 3 adds RMS norms on queries and keys (perturbed by _perturb) and a rotary base per layer type,
    # far apart here so that swapping them would show within the 9 test tokens.
    "gemma3_text": lambda: Gemma3ForCausalLM(
        Gemma3TextConfig(
            num_key_value_heads=2,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 3.0},
                "full_attention": {"rope_type": "default", "rope_theta": 500.0},
            },
            attn_implementation="eager",
            **_DECODER,
        )
    ),
    # Parallel attention and MLP, a quarter of each head rotary (as in Pythia), a non-default base.
    # Larger weights: at the default init, attention is too uniform for the base to matter.
    "gpt_neox": lambda: GPTNeoXForCausalLM(
        GPTNeoXConfig(
            rope_parameters={"rope_theta": 100.0, "partial_rotary_factor": 0.25, "rope_type": "default"},
            initializer_range=0.1,
            **_DECODER,
        )
    ),
}
# What each family's converted config must show (besides matching HF's outputs).
FEATURES = {
    "llama": dict(n_key_value_heads=2, normalization_type="RMS"),
    "mistral": dict(use_local_attn=True, window_size=4, attn_types=["local", "local"]),
    "gemma2": dict(
        d_head=32,
        attn_scale=24**0.5,
        attn_scores_soft_cap=0.05,
        output_logits_soft_cap=1.0,
        use_local_attn=True,
        window_size=4,
        attn_types=["local", "global"],
        use_normalization_before_and_after=True,
    ),
    "gemma3_text": dict(
        use_qk_norm=True,
        rotary_base=500.0,
        rotary_base_local=3.0,
        attn_scale=24**0.5,
        window_size=4,
        attn_types=["local", "global"],
        default_prepend_bos=True,
    ),
    "gpt_neox": dict(rotary_dim=4, rotary_base=100.0, parallel_attn_mlp=True, normalization_type="LN"),
}


# transformers 5 loads model_type qwen2 with Qwen2Tokenizer (byte-level BPE rebuilt from the
# vocabulary) whatever tokenizer_config.json declares, so the word-level test vocabulary does not
# tokenize there. Real Qwen2 tokenizers are byte-level BPE; tests that feed token ids are unaffected.
REBUILT_TOKENIZERS = {"qwen2"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(arch)`` -> (directory, HF model), saved once per module. The directory name holds
    the architecture's name ("tiny-gemma2-ckpt"), which TL's name-based config branches must not see."""
    saved = {}

    def get(arch):
        if arch not in saved:
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(f"tiny-{arch}-ckpt")
            saved[arch] = path, _save(ARCHS[arch](), path)
        return saved[arch]

    return get


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """``loaded(arch)`` -> the float32 CPU HookedTransformer, loaded once per module (tests leave it as
    they found it: hooks are removed on exit, the layout test restores the layout)."""
    models_ = {}

    def get(arch):
        if arch not in models_:
            models_[arch] = load_model(str(checkpoint(arch)[0]), device="cpu")
        return models_[arch]

    return get


def _tokens():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_logprobs_match_hf(arch, checkpoint, loaded):
    _, hf_model = checkpoint(arch)
    model = loaded(arch)
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(tokens).logits.log_softmax(-1)
        got = model(tokens).log_softmax(-1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert model.cfg.dtype == torch.float32
    assert model.cfg.d_vocab == VOCAB
    assert model.cfg.device == "cpu"
    # The hook names the rest of hpr relies on exist on the loaded model.
    assert resid_post_hook(1) in model.hook_dict
    assert head_z_hook(0) in model.hook_dict
    # The attached tokenizer is the checkpoint's; BOS is prepended exactly once when asked for, and by
    # default only for the Gemma family: MC scoring follows lm-evaluation-harness, which adds none but there.
    if arch not in REBUILT_TOKENIZERS:
        assert model.to_tokens("w0 w1", prepend_bos=True).tolist() == [[1, 4, 5]]
        bos = [1] if arch in BOS_MODEL_TYPES else []
        assert model.to_tokens("w0 w1").tolist() == [bos + [4, 5]]


@pytest.mark.parametrize("arch", list(FEATURES))
def test_architecture_features(arch, loaded):
    cfg = loaded(arch).cfg
    assert {k: getattr(cfg, k) for k in FEATURES[arch]} == FEATURES[arch]


@pytest.mark.parametrize("arch, scale", [("llama-tied", 1.0), ("gemma2", 64**0.5)])
def test_tied_embeddings(arch, scale, checkpoint, loaded):
    path, hf_model = checkpoint(arch)
    with safe_open(path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied in the checkpoint, not just in memory
    model = loaded(arch)
    # Gemma multiplies the embedding by sqrt(d_model) (TL folds that into W_E), not the unembedding.
    torch.testing.assert_close(model.W_E, hf_model.get_input_embeddings().weight * scale, rtol=0, atol=0)
    torch.testing.assert_close(model.W_U, hf_model.get_input_embeddings().weight.T, rtol=0, atol=0)


def test_qwen2_qkv_biases(checkpoint, loaded):
    _, hf = checkpoint("qwen2")
    attn, hf_attn = loaded("qwen2").blocks[1].attn, hf.model.layers[1].self_attn
    torch.testing.assert_close(attn.b_Q, hf_attn.q_proj.bias.reshape(4, 16), rtol=0, atol=0)
    torch.testing.assert_close(attn.b_V, hf_attn.v_proj.bias.reshape(2, 16).repeat_interleave(2, 0), rtol=0, atol=0)


def _random_hpr_editor(resid: torch.Tensor, layer: int, n_layers: int, folder):
    """An HPR editor of ``layer`` with random angle nets and a random probe made orthogonal to the mean
    of ``resid`` (that layer's activations), so that it splits them: a random probe can leave every
    token on its positive side, where HPR changes nothing. Saved and loaded back."""
    torch.manual_seed(0)
    net = LayerwiseHPR(n_layers, resid.shape[-1])
    mean = ops.unit(resid.reshape(-1, resid.shape[-1]).float().mean(0))
    with torch.no_grad():
        net.probe[layer] -= (net.probe[layer] @ mean) * mean
    HPREditor.from_layerwise(net, (layer,)).save(folder)
    return load_editor(folder)


def _run_edited(model, editor, layer, tokens):
    """Logits and the edited resid_post at ``layer`` under ``editor``."""
    seen = {}
    with editor.applied(model):
        # Attached after the editor's hook, so it sees the edited activation.
        with model.hooks(fwd_hooks=[(resid_post_hook(layer), lambda a, hook: seen.update(h=a))]):
            logits = model(tokens)
    return logits, seen["h"]


def _resid_post(model, layer, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=resid_post_hook(layer))
    return cache[resid_post_hook(layer)]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hpr_edit_round_trip(arch, loaded, tmp_path):
    model = loaded(arch)
    tokens = _tokens()
    with torch.no_grad():
        base_logits, base = model(tokens), _resid_post(model, 1, tokens)
        editor = _random_hpr_editor(base, 1, model.cfg.n_layers, tmp_path / "hpr")
        logits, edited = _run_edited(model, editor, 1, tokens)
        after = model(tokens)
    assert not torch.equal(edited, base) and not torch.allclose(logits, base_logits)
    assert ops.relative_norm_change(edited, base).max() < 1e-5
    assert torch.equal(after, base_logits)
    assert all(not hp.fwd_hooks for hp in model.hook_dict.values())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_matmul_layout_saves_the_per_call_weight_copies_and_changes_nothing(arch, loaded):
    """load_model stores W_U, W_Q/K/V/O (and gated-MLP weights) in the order TL permutes them into."""
    from hpr.models import use_matmul_layout

    model = loaded(arch)
    attn, unembed = model.blocks[0].attn, model.unembed
    assert unembed.W_U.T.is_contiguous() and not unembed.W_U.is_contiguous()
    assert attn.W_Q.permute(0, 2, 1).is_contiguous() and attn.W_O.permute(2, 0, 1).is_contiguous()
    if hasattr(model.blocks[0].mlp, "W_gate"):
        assert model.blocks[0].mlp.W_gate.T.is_contiguous()
    tokens = _tokens()
    with torch.no_grad():
        fast = model(tokens)
        for p in model.parameters():  # back to the default (contiguous) layout
            p.data = p.data.contiguous()
        assert unembed.W_U.is_contiguous()
        default = model(tokens)
        use_matmul_layout(model)
        again = model(tokens)
    assert torch.equal(fast, default) and torch.equal(fast, again)  # the same matmuls on the same values
    assert isinstance(unembed.W_U, torch.nn.Parameter)


def test_gpt2_weights_unprocessed(checkpoint, loaded):
    _, hf = checkpoint("gpt2")
    model = loaded("gpt2")
    assert model.cfg.normalization_type == "LN"  # "LNPre" after folding
    torch.testing.assert_close(model.blocks[0].ln1.w, hf.transformer.h[0].ln_1.weight)
    torch.testing.assert_close(model.blocks[1].ln2.b, hf.transformer.h[1].ln_2.bias)
    torch.testing.assert_close(model.ln_final.w, hf.transformer.ln_f.weight)
    torch.testing.assert_close(model.W_E, hf.transformer.wte.weight)  # not centered
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.T)  # not centered
    b_v = hf.transformer.h[0].attn.c_attn.bias[128:].reshape(4, 16)
    torch.testing.assert_close(model.blocks[0].attn.b_V, b_v)  # value bias not folded


def test_llama_weights_unprocessed(checkpoint, loaded):
    _, hf = checkpoint("llama")
    model = loaded("llama")
    assert model.cfg.normalization_type == "RMS"  # "RMSPre" after folding
    assert model.cfg.n_key_value_heads == 2
    torch.testing.assert_close(model.blocks[0].ln1.w, hf.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(model.ln_final.w, hf.model.norm.weight)
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.T)


def test_dtype_strings(checkpoint):
    path, _ = checkpoint("gpt2")
    model = load_model(str(path), device=torch.device("cpu"), dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16
    assert model.W_E.dtype == torch.bfloat16
    assert torch.isfinite(model(_tokens()).float()).all()


def test_bfloat16_llama_and_its_hpr_edit(checkpoint, tmp_path):
    path, hf_model = checkpoint("llama-tied")
    model = load_model(str(path), device="cpu", dtype="bf16")
    assert model.cfg.dtype == torch.bfloat16 and model.W_U.dtype == torch.bfloat16
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(tokens).logits.log_softmax(-1)
        base_logits, base = model(tokens), _resid_post(model, 1, tokens)
        editor = _random_hpr_editor(base, 1, model.cfg.n_layers, tmp_path / "hpr")
        logits, edited = _run_edited(model, editor, 1, tokens)
    torch.testing.assert_close(base_logits.float().log_softmax(-1), expected, atol=0.05, rtol=0)
    assert edited.dtype == torch.bfloat16 and not torch.equal(edited, base)
    # HPR's math is float32; only the cast back rounds, by at most bf16's unit roundoff per element
    # (the same edit computed in bfloat16 changes norms by ~1e-2 here).
    assert ops.relative_norm_change(edited.float(), base.float()).max() <= 2**-8
    assert torch.equal(model(tokens), base_logits)


def test_float16_needs_a_gpu(checkpoint):
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        load_model(str(checkpoint("gpt2")[0]), device="cpu", dtype="float16")
    assert model_dtype("fp16", "cuda") is torch.float16  # refused on CPUs only
    assert model_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="Unsupported dtype 'float8'"):
        model_dtype("float8", "cpu")


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, torch.float32),
        ("float32", torch.float32),
        ("fp16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.float64, torch.float64),
    ],
)
def test_resolve_dtype(given, expected):
    assert _resolve_dtype(given) is expected


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ValueError, match="dtype"):
        _resolve_dtype("float8")


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_model(str(tmp_path / "does-not-exist"), device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize(
    "config",
    [
        FalconConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4),  # TL has no Falcon
        OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4),  # TL converts OPT
    ],
)
def test_unsupported_architecture(config, tmp_path):
    # Only the config is needed: the model type is refused before anything else is read.
    config.save_pretrained(tmp_path)
    supported = re.escape(", ".join(SUPPORTED_MODEL_TYPES))
    assert "gemma2" in supported and "gpt_neox" in supported
    with pytest.raises(ValueError, match=f"'{config.model_type}' is not supported.*{supported}"):
        load_model(str(tmp_path), device="cpu")


def test_sliding_window_that_tl_would_drop_is_refused(tmp_path):
    # Qwen2 slides its upper layers when use_sliding_window is set; TL's Qwen2 conversion ignores it.
    cfg = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **_DECODER)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"sliding windows \(per layer: \[None, 4\]\).*\(\[None, None\]\)"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("name", ["gpt2", "hpr-tests/no-such-model"])
def test_hub_name_offline_error(name, monkeypatch):
    if huggingface_hub.try_to_load_from_cache(name, "config.json"):
        pytest.skip(f"{name} is in the local hub cache")
    # Set after huggingface_hub was imported: load_model must still honour it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="download the checkpoint elsewhere") as info:
        load_model(name, device="cpu")
    assert "offline" in str(info.value)

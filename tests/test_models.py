"""hpr.models: offline loading of local HF checkpoints into an unprocessed HookedTransformer.

Tiny randomly initialised GPT-2 and Llama (GQA) checkpoints are written to disk with a
tokenizer built in memory, so nothing here needs network access or downloaded weights.
"""

import huggingface_hub
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    FalconConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from hpr.models import _resolve_dtype, head_z_hook, load_model, resid_post_hook

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


def _perturb_norms(hf_model) -> None:
    """Non-trivial norm weights/biases, so folding or centering would be detectable."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _save(hf_model, path):
    _perturb_norms(hf_model)
    hf_model.eval()
    hf_model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return hf_model


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    # n_inner != 4 * n_embd: TL assumes 4x, hpr.models must take the real width.
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_inner=96, n_positions=128, vocab_size=VOCAB, **IDS
    )
    path = tmp_path_factory.mktemp("tiny-gpt2")
    return path, _save(GPT2LMHeadModel(cfg), path)


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=128,
        vocab_size=VOCAB,
        **IDS,
    )
    # "llama" in the directory name: TL's name-based config branch must not trigger.
    path = tmp_path_factory.mktemp("tiny-llama-ckpt")
    return path, _save(LlamaForCausalLM(cfg), path)


def _tokens():
    return torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("ckpt", ["gpt2_ckpt", "llama_ckpt"])
def test_logprobs_match_hf(ckpt, request):
    path, hf_model = request.getfixturevalue(ckpt)
    model = load_model(str(path), device="cpu")
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
    # The attached tokenizer is the checkpoint's; BOS is prepended exactly once when asked for, and
    # not by default: MC scoring follows lm-evaluation-harness, which adds none.
    assert model.to_tokens("w0 w1", prepend_bos=True).tolist() == [[1, 4, 5]]
    assert model.to_tokens("w0 w1").tolist() == [[4, 5]]


@pytest.mark.parametrize("ckpt", ["gpt2_ckpt", "llama_ckpt"])
def test_matmul_layout_saves_the_per_call_weight_copies_and_changes_nothing(ckpt, request):
    """load_model stores W_U, W_Q/K/V/O (and gated-MLP weights) in the order TL permutes them into."""
    from hpr.models import use_matmul_layout

    path, _ = request.getfixturevalue(ckpt)
    model = load_model(str(path), device="cpu")
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


def test_gpt2_weights_unprocessed(gpt2_ckpt):
    path, hf = gpt2_ckpt
    model = load_model(str(path), device="cpu")
    assert model.cfg.normalization_type == "LN"  # "LNPre" after folding
    torch.testing.assert_close(model.blocks[0].ln1.w, hf.transformer.h[0].ln_1.weight)
    torch.testing.assert_close(model.blocks[1].ln2.b, hf.transformer.h[1].ln_2.bias)
    torch.testing.assert_close(model.ln_final.w, hf.transformer.ln_f.weight)
    torch.testing.assert_close(model.W_E, hf.transformer.wte.weight)  # not centered
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.T)  # not centered
    b_v = hf.transformer.h[0].attn.c_attn.bias[128:].reshape(4, 16)
    torch.testing.assert_close(model.blocks[0].attn.b_V, b_v)  # value bias not folded


def test_llama_weights_unprocessed(llama_ckpt):
    path, hf = llama_ckpt
    model = load_model(str(path), device="cpu")
    assert model.cfg.normalization_type == "RMS"  # "RMSPre" after folding
    assert model.cfg.n_key_value_heads == 2
    torch.testing.assert_close(model.blocks[0].ln1.w, hf.model.layers[0].input_layernorm.weight)
    torch.testing.assert_close(model.ln_final.w, hf.model.norm.weight)
    torch.testing.assert_close(model.W_U, hf.lm_head.weight.T)


def test_dtype_strings(gpt2_ckpt):
    path, _ = gpt2_ckpt
    model = load_model(str(path), device=torch.device("cpu"), dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16
    assert model.W_E.dtype == torch.bfloat16
    assert torch.isfinite(model(_tokens()).float()).all()


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


def test_unsupported_architecture(tmp_path):
    # Only the config is needed: conversion fails before any weights are read.
    cfg = FalconConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4)
    cfg.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="falcon.*not currently supported.*gpt2, llama"):
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

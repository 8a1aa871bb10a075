"""Random-init checkpoints of real shapes, saved with ``transformers`` and loaded with ``hpr.load_model``.

No network and no downloaded weights: the tokenizer is a byte-level BPE trained in memory on TruthfulQA
text (the QA primer, questions and answers), so prompts tokenize to realistic lengths; the models keep
their real vocabulary sizes (embedding and unembedding cost are part of the forward pass), the ids the
tokenizer produces are simply a subset of them. Checkpoints are cached under the bench cache directory
(``bench/.cache`` by default) keyed by their shape, and loaded through the same path a user's local
checkpoint takes (:func:`hpr.sources.load_model`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# the shared data beside the repository unless HPR_TRUTHFULQA_PATH names another folder
SHARED_TRUTHFULQA = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa"
TRUTHFULQA = Path(os.environ.get("HPR_TRUTHFULQA_PATH") or SHARED_TRUTHFULQA)


@dataclass(frozen=True)
class Shape:
    name: str
    arch: str  # "gpt2" | "llama"
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    vocab: int
    n_ctx: int
    n_kv_heads: int | None = None  # llama: grouped-query attention
    tied: bool = False  # llama: unembedding tied to the embedding (GPT-2 checkpoints always tie: HF's default)

    @property
    def key(self) -> str:
        # Fields added after the first checkpoints were cached enter the key only when set, so the shapes
        # that existed keep their keys (and their cached checkpoints).
        return "-".join(f"{v}" for k, v in asdict(self).items() if k not in _LATE_FIELDS or v != _LATE_FIELDS[k])


_LATE_FIELDS = {"tied": False}


# GPT-2 small: 12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257, 1024 positions.
GPT2_SMALL = Shape("gpt2-small", "gpt2", 12, 768, 12, 3072, 50257, 1024)
# Llama-shaped, cut to CPU size: 8 layers, d_model 1024, 16 query heads / 4 KV heads (GQA), SwiGLU 2816,
# RMSNorm, rotary, Llama-2's vocabulary of 32000 (~155M parameters).
LLAMA_SMALL = Shape("llama-8L-1024", "llama", 8, 1024, 16, 2816, 32000, 2048, n_kv_heads=4)
# Smoke sizes: same architectures, tiny.
GPT2_TINY = Shape("gpt2-tiny", "gpt2", 2, 64, 4, 128, 2048, 1024)
LLAMA_TINY = Shape("llama-tiny", "llama", 2, 64, 4, 128, 2048, 1024, n_kv_heads=2)
# SmolLM2-135M-Instruct, the real model users run on CPU: Llama, 30 layers, d_model 576, 9 query heads /
# 3 KV heads (GQA, head_dim 64), SwiGLU 1536, vocabulary 49152, tied embeddings (~135M parameters). Its
# rope_theta (100000) and 8192 positions are not reproduced: neither changes the cost of a forward pass
# at these lengths, and 2048 positions keep TL's per-layer mask and rotary tables small.
SMOLLM2_SHAPE = Shape("smollm2-shape", "llama", 30, 576, 9, 1536, 49152, 2048, n_kv_heads=3, tied=True)
# Its smoke stand-in: tiny, but tied and GQA like it.
LLAMA_TINY_TIED = Shape("llama-tiny-tied", "llama", 2, 64, 4, 128, 2048, 1024, n_kv_heads=2, tied=True)

TOKENIZER_VOCAB = 8192


def questions():
    from hpr.sources import load_dataset

    return load_dataset("truthfulqa", str(TRUTHFULQA))


def _train_tokenizer(path: Path, vocab: int):
    """A GPT-2-style byte-level BPE trained on TruthfulQA text (plus the QA primer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hpr.data import QA_PRIMER

    texts = [QA_PRIMER]
    for q in questions():
        texts.append("Q: " + q.question + "\nA:")
        texts.extend(" " + c.text for c in q.mc2)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(path)


def _hf_model(shape: Shape):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=0)
    if shape.arch == "gpt2":
        cfg = GPT2Config(
            n_layer=shape.n_layers,
            n_embd=shape.d_model,
            n_head=shape.n_heads,
            n_inner=shape.d_mlp,
            n_positions=shape.n_ctx,
            vocab_size=shape.vocab,
            **ids,
        )
        return GPT2LMHeadModel(cfg)
    if shape.arch == "llama":
        cfg = LlamaConfig(
            hidden_size=shape.d_model,
            intermediate_size=shape.d_mlp,
            num_hidden_layers=shape.n_layers,
            num_attention_heads=shape.n_heads,
            num_key_value_heads=shape.n_kv_heads,
            max_position_embeddings=shape.n_ctx,
            vocab_size=shape.vocab,
            tie_word_embeddings=shape.tied,
            **ids,
        )
        return LlamaForCausalLM(cfg)
    raise ValueError(f"unknown arch {shape.arch!r}")


def checkpoint(shape: Shape, cache: Path) -> Path:
    """The checkpoint directory of ``shape`` under ``cache``, written (atomically) on first use."""
    # Neutral directory names: hpr.models guards against TL's name-based config branches anyway,
    # but a user's directory might be called anything.
    folder = cache / f"ckpt-{shape.key}"
    if (folder / "done.json").exists():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        model = _hf_model(shape)
        model.eval()
        model.save_pretrained(tmp)
        _train_tokenizer(tmp, min(TOKENIZER_VOCAB, shape.vocab))
        (tmp / "done.json").write_text(json.dumps(asdict(shape)))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def load(shape: Shape, cache: Path):
    """``hpr.load_model`` on the cached checkpoint, on CPU, float32."""
    from hpr.sources import load_model

    return load_model(str(checkpoint(shape, cache)), device="cpu")

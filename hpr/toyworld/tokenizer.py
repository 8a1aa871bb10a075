"""The toy world's tokenizer, trained offline with the ``tokenizers`` library.

``kind="word"`` (the default world's): byte-level pre-tokenisation (GPT-2's word split, a leading space
kept as ``Ġ``) and one id per distinct word. The toy language has a few hundred words, so the vocabulary
is that small and the unembedding, a third of the training FLOPs at a 1k BPE vocabulary, nearly vanishes.
Words never seen in training map to ``<|unk|>``. ``kind="bpe"``: byte-level BPE, which never needs
``<|unk|>`` but spends a ~900-token softmax on the same text.

TransformerLens needs a tokenizer that round-trips through ``AutoTokenizer.from_pretrained(dir)``
(an in-memory one fails with ``KeyError: 'name_or_path'``), so we always save and reload.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

END_OF_DOC = "<|endoftext|>"
UNKNOWN = "<|unk|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path, kind: str = "bpe"):
    """Train, save to ``out_dir`` and return the reloaded ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    trainer: trainers.Trainer
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNKNOWN))
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size, special_tokens=[END_OF_DOC, UNKNOWN], show_progress=False
        )
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[END_OF_DOC],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:
        raise ValueError(f"tokenizer kind must be 'word' or 'bpe', got {kind!r}")
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer=trainer)
    extra = {"unk_token": UNKNOWN} if kind == "word" else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_DOC,
        bos_token=END_OF_DOC,
        pad_token=END_OF_DOC,
        model_max_length=1 << 30,
        **extra,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)

"""One memory measurement of ``tests/test_memory.py``, in a fresh process; prints one JSON line.

Run as ``python tests/memory_probe.py heads|collect N_QUESTIONS SEED WORK_DIR``. A test process carries
the allocator state of every test before it (on the full suite, hundreds of MB that one call reuses and the
next does not), so two growths measured in it are not comparable; two fresh processes start alike.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LM_WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(40)]


def wide_lm(folder: Path):
    """4 layers, d_model 256, 8 heads and 400-token prompts: one batch of 8 is ~30 MB of head outputs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from hpr.models import new_hooked_transformer

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(folder)
    cfg = dict(
        n_layers=4,
        d_model=256,
        n_heads=8,
        d_head=32,
        d_mlp=512,
        n_ctx=512,
        d_vocab=len(LM_WORDS),
        normalization_type="LN",
        act_fn="gelu",
    )
    model = new_hooked_transformer(cfg, AutoTokenizer.from_pretrained(folder), seed=0).eval()
    model.cfg.default_prepend_bos = True
    return model  # parameters require grad, as a freshly built model's do: the hard case


def questions(n: int, seed: int):
    import torch

    from hpr.data.schema import Choice, MCQuestion

    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{i}" for i in torch.randint(0, 40, (k,), generator=g).tolist())

    # Distinct contexts (no shared primer), so every question really runs its 400 tokens.
    return [
        MCQuestion(
            f"q{i}",
            words(400),
            (Choice(words(3), True), Choice(words(3), False)),
            (Choice(words(3), True), Choice(words(3), False)),
        )
        for i in range(n)
    ]


def measure(mode: str, n: int, seed: int, work: Path) -> dict:
    from bench.memory_worker import peak_growth
    from hpr import activations
    from hpr.data import PromptFormat
    from hpr.editors.iti import answer_head_activations

    model = wide_lm(work / "tokenizer")
    qs = questions(n, seed)
    fmt = PromptFormat(primer="")
    if mode == "heads":
        (result, _), grown = peak_growth(lambda: answer_head_activations(model, qs, fmt, batch_size=8))
        shards = 0
    else:
        got, grown = peak_growth(
            lambda: activations.collect(model, qs, fmt, work / "acts", questions_per_shard=8, batch_size=8)
        )
        result = got.acts
        shards = len(list((work / "acts").glob("shard-*.safetensors")))
    return {
        "grown": int(grown),
        "result_bytes": result.numel() * result.element_size(),
        "detached": result.grad_fn is None,
        "owns_storage": result._base is None,
        "shards": shards,
    }


if __name__ == "__main__":
    mode, n, seed, work = sys.argv[1:]
    print(json.dumps(measure(mode, int(n), int(seed), Path(work))))

"""Shared fixtures. Test files take what they need from here as fixtures, never by ``from conftest import``.

Tiny models:
  tiny_world        the tiny toy world's ToyWorldConfig (builds in seconds)
  tiny_toy          "toy" pointed at the tiny world for one test, cached once per session
  tiny_run_folder   ``with tiny_run_folder(folder, methods) as out``: a finished tiny ``hpr reproduce`` run
  tiny_tl_model     ``tiny_tl_model(seed=0, **changes)``: a fresh 3-layer d_model-32 HookedTransformer, no tokenizer
  tiny_lm           ``tiny_lm(family)``: a 2-layer HookedTransformer over the word tokenizer ``word_tokenizer``

Data:
  truthfulqa_dir    the TruthfulQA folder: $HPR_TRUTHFULQA_PATH, else ../shared/data/truthfulqa beside the repository,
                    else the committed sample in tests/data/truthfulqa
"""

import contextlib
import os
from pathlib import Path

import pytest

from hpr.data.truthfulqa import TRUTHFULQA_ENV
from hpr.toyworld import ToyWorldConfig

REPO = Path(__file__).resolve().parent.parent
TRUTHFULQA_FILES = ("mc_task.json", "TruthfulQA.csv")
TRUTHFULQA_SHARED = REPO.parent / "shared" / "data" / "truthfulqa"
TRUTHFULQA_SAMPLE = Path(__file__).resolve().parent / "data" / "truthfulqa"

# A toy world small enough to build in seconds: enough to exercise every step, not to learn much.
_TINY_WORLD = ToyWorldConfig(
    n_entities=16,
    questions_per_entity=2,
    n_docs=400,
    n_layers=2,
    d_model=32,
    n_heads=2,
    d_mlp=64,
    n_ctx=64,
    vocab_size=400,
    steps=30,
    batch_size=8,
)
# A tiny random HookedTransformer (3 layers, d_model 32, 2 heads of 16, vocabulary 50), for editor tests.
_TINY_TL = {
    "n_layers": 3,
    "d_model": 32,
    "n_heads": 2,
    "d_head": 16,
    "d_mlp": 64,
    "n_ctx": 16,
    "d_vocab": 50,
    "act_fn": "gelu",
    "normalization_type": "LN",
}


@pytest.fixture(autouse=True)
def no_hook_left_attached(monkeypatch):
    """Fail a test that leaves a forward or backward hook on any TransformerLens hook point it touched."""
    from transformer_lens.hook_points import HookPoint

    touched = []
    add_hook = HookPoint.add_hook

    def recording(self, *args, **kwargs):
        touched.append(self)
        return add_hook(self, *args, **kwargs)

    monkeypatch.setattr(HookPoint, "add_hook", recording)
    yield
    leaked = sorted({hp.name for hp in touched if hp.fwd_hooks or hp.bwd_hooks})
    assert not leaked, f"hooks left attached at {leaked}"


@pytest.fixture(autouse=True)
def one_worker_by_default(monkeypatch):
    """``hpr reproduce`` on one process in tests, unless a test asks for more: a spawned worker costs seconds
    of start-up per run, and does not see a test's monkeypatches. tests/test_parallel.py runs the workers."""
    monkeypatch.setattr("hpr.runs.parallel.default_workers", lambda device=None, pass_threads=1: 1)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hpr-cache")


@pytest.fixture(scope="session")
def tiny_world() -> ToyWorldConfig:
    """The tiny toy world's config (frozen, so one object serves the whole session)."""
    return _TINY_WORLD


@pytest.fixture
def tiny_toy(monkeypatch, toy_cache, tiny_world):
    """Point "toy" at the tiny world, cached once per test session."""
    import hpr.toyworld

    monkeypatch.setenv("HPR_CACHE_DIR", str(toy_cache))
    monkeypatch.setattr(hpr.toyworld, "DEFAULT", tiny_world)
    return tiny_world


@pytest.fixture(scope="session")
def tiny_run_folder(toy_cache, tiny_world):
    """``with tiny_run_folder(folder, methods) as out``: a finished ``hpr reproduce`` run of the tiny world in
    ``folder`` (``methods`` as for ``--methods``); "toy" stays the tiny world inside the ``with``."""

    @contextlib.contextmanager
    def run_folder(folder, methods: str):
        import hpr.toyworld
        from hpr.cli import main

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HPR_CACHE_DIR", str(toy_cache))
            patch.setattr(hpr.toyworld, "DEFAULT", tiny_world)
            assert main(["reproduce", "--out", str(folder), "--quiet", "--methods", methods, "--workers", "1"]) == 0
            yield folder

    return run_folder


@pytest.fixture(scope="session")
def tiny_tl_model():
    """``tiny_tl_model(seed=0, **changes)``: a freshly initialised (not eval()'d) 3-layer d_model-32
    HookedTransformer without a tokenizer; ``changes`` override its config fields (e.g. ``n_layers=2``)."""
    from hpr.models import new_hooked_transformer

    def make(seed: int = 0, **changes):
        return new_hooked_transformer({**_TINY_TL, **changes}, tokenizer=None, seed=seed)

    return make


# Tiny random language models of both families, with a word-level tokenizer over "w0".."w39".
LM_WORDS = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(40)]
LM_FAMILIES = {
    "gpt2-like": dict(normalization_type="LN", act_fn="gelu"),
    "llama-like": dict(
        normalization_type="RMS",
        act_fn="silu",
        positional_embedding_type="rotary",
        rotary_dim=8,
        gated_mlp=True,
        n_key_value_heads=2,
    ),
}


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    """Saved and reloaded, as TransformerLens wants a tokenizer with a name_or_path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(LM_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path_factory.mktemp("word-tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    ).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def tiny_lm(word_tokenizer):
    """``tiny_lm(family, n_ctx=32)``: a 2-layer d_model-32 HookedTransformer that prepends BOS."""
    from hpr.models import new_hooked_transformer

    def make(family: str, n_ctx: int = 32):
        cfg = dict(
            n_layers=2,
            d_model=32,
            n_heads=4,
            d_head=8,
            d_mlp=64,
            n_ctx=n_ctx,
            d_vocab=len(LM_WORDS),
            **LM_FAMILIES[family],
        )
        model = new_hooked_transformer(cfg, word_tokenizer, seed=0).eval()
        model.cfg.default_prepend_bos = True
        return model

    return make


# --- TruthfulQA ---------------------------------------------------------------------------------------


def _truthfulqa_choice() -> tuple[Path, str]:
    """(folder, where it came from); the folder may be missing when it came from the environment."""
    value = os.environ.get(TRUTHFULQA_ENV)
    if value:
        return Path(value).expanduser().absolute(), f"${TRUTHFULQA_ENV}"
    if all((TRUTHFULQA_SHARED / name).is_file() for name in TRUTHFULQA_FILES):
        return TRUTHFULQA_SHARED, "the shared data beside the repository"
    return TRUTHFULQA_SAMPLE, "the committed sample"


def pytest_report_header(config):
    folder, source = _truthfulqa_choice()
    return f"TruthfulQA: {folder} ({source})"


@pytest.fixture(scope="session")
def truthfulqa_dir() -> Path:
    """The folder holding TruthfulQA's ``mc_task.json`` and ``TruthfulQA.csv``: ``$HPR_TRUTHFULQA_PATH`` if set (a
    test fails if it lacks them), else ``<repo>/../shared/data/truthfulqa`` if it holds both, else the
    committed sample ``tests/data/truthfulqa`` (the first questions of the real files)."""
    folder, source = _truthfulqa_choice()
    if source.startswith("$"):
        missing = [name for name in TRUTHFULQA_FILES if not (folder / name).is_file()]
        if missing:
            problem = "no such folder" if not folder.is_dir() else "it has no " + " and no ".join(missing)
            pytest.fail(
                f"{TRUTHFULQA_ENV}={folder}: {problem}. Fix: point {TRUTHFULQA_ENV} at a folder holding "
                f"{' and '.join(TRUTHFULQA_FILES)}, or unset it to use {TRUTHFULQA_SHARED} if present, "
                f"else the sample in {TRUTHFULQA_SAMPLE}.",
                pytrace=False,
            )
    return folder

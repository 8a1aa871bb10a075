import contextlib

import pytest

from hpr.toyworld import ToyWorldConfig

# A toy world small enough to build in seconds: enough to exercise every step, not to learn much.
TINY = ToyWorldConfig(n_entities=16, questions_per_entity=2, n_docs=400, n_layers=2, d_model=32, n_heads=2,
                      d_mlp=64, n_ctx=64, vocab_size=400, steps=30, batch_size=8)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hpr-cache")


@pytest.fixture
def tiny_toy(monkeypatch, toy_cache):
    """Point "toy" at the tiny world, cached once per test session."""
    import hpr.toyworld

    monkeypatch.setenv("HPR_CACHE_DIR", str(toy_cache))
    monkeypatch.setattr(hpr.toyworld, "DEFAULT", TINY)
    return TINY


@contextlib.contextmanager
def tiny_run_folder(toy_cache, folder, methods: str):
    """A finished ``hpr reproduce`` run of the tiny world in ``folder``; "toy" stays the tiny world inside."""
    import hpr.toyworld
    from hpr.cli import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HPR_CACHE_DIR", str(toy_cache))
        patch.setattr(hpr.toyworld, "DEFAULT", TINY)
        assert main(["reproduce", "--out", str(folder), "--quiet", "--methods", methods]) == 0
        yield folder

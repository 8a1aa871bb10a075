"""Threads: every fit on one thread, so a run is bit-reproducible; the model's forward passes on more on request.

Training is not bit-reproducible across thread counts: a reduction split over two threads (a weight gradient, a
mean over thousands of activations, an SVD, sklearn's BLAS) adds its parts in another order, so a toy build or
an HPR fit under two threads differs from one under one thread in the last bits, and then in whole predictions.
Inside :func:`reproducible` everything runs on one torch thread (and one BLAS thread, for numpy and sklearn),
``model``'s forward passes included unless ``pass_threads`` says otherwise.

More pass threads are faster but not bit-identical: MKL's matrix products with 5 to 11 rows round differently on
two threads than on one (measured here on every shape of SmolLM2's layers; MKL 2024.2, AVX2), and HPR's angle
network sees such row counts (the negative-side tokens of a batch), so a ``--limit 60`` SmolLM2 run on two pass
threads scores HPR differently in the last bits; every other method, every editor and every greedy answer came
out identical. MKL's strict reproducibility mode (``MKL_CBWR=AUTO,STRICT``, set before torch loads) makes those
products thread-invariant, but it also changes one-thread results of one-column products (HPR's last angle
layer), so it is not turned on here. A run uses more cores bit-identically by spreading its steps over
processes of one thread each instead (:mod:`hpr.runs.parallel`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

__all__ = ["model_pass", "one_thread", "reproducible"]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread and one BLAS thread inside; the caller's counts restored on the way out."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(before)


_pass_threads: int | None = None  # set inside reproducible(): the threads of a forward pass
# Thread counts are the process's: a second run in one process (two app sessions) waits for the first.
_one_run_at_a_time = threading.Lock()


@contextlib.contextmanager
def model_pass() -> Iterator[None]:
    """Run the block on the forward passes' threads when inside :func:`reproducible` (else as it is).

    For forward computation done outside ``model(...)``, row by row: the final norm, unembedding and
    log-softmax of chosen positions after a pass stopped at the last block."""
    if _pass_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(_pass_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def reproducible(model, pass_threads: int = 1) -> Iterator[None]:
    """One thread for everything inside; ``model``'s forward passes on ``pass_threads`` (1: the run is then
    bit-identical whatever the machine's thread settings; more is faster, see the module docstring).

    The hooks go on ``model`` itself (``model(...)``, not its blocks called one by one); the one after the pass
    runs even when the pass raises, so no fit ever runs on the passes' threads.
    """
    global _pass_threads
    threads = pass_threads
    if threads < 1:
        raise ValueError(f"pass_threads must be at least 1, got {threads}")

    def before_pass(module, args):
        torch.set_num_threads(threads)

    def after_pass(module, args, output):
        torch.set_num_threads(1)

    with _one_run_at_a_time, one_thread():
        handles = [
            model.register_forward_pre_hook(before_pass),
            model.register_forward_hook(after_pass, always_call=True),
        ]
        _pass_threads = threads
        try:
            yield
        finally:
            _pass_threads = None
            for handle in handles:
                handle.remove()

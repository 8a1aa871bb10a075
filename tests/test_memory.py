"""Memory is part of correctness: collecting activations keeps one batch alive at a time, whatever the data size.

Each measurement runs in a fresh process (``tests/memory_probe.py``): peak RSS growth of one call, sampled by
a thread while it runs (bench.memory_worker.peak_growth). The model is sized so that one batch's activations
are tens of MB: code that keeps a view into every batch (the old ITI head collection kept each batch's whole
``hook_z`` cache) grows by hundreds of MB between the two sizes, far beyond the slack; code that copies out
what it keeps grows by its result alone.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.timing import STEADY_HEAP

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
SLACK = 80 * 2**20  # noise between two fresh processes (~20 MB seen); a leak of one batch per batch is ~5x this


def _measure(mode: str, questions: int, seed: int, work: Path) -> dict:
    work.mkdir()
    # The default allocator: a heap that keeps freed memory would hide RSS growth.
    env = {k: v for k, v in os.environ.items() if k not in STEADY_HEAP}
    cmd = [sys.executable, str(PROBE), mode, str(questions), str(seed), str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _overhead(record: dict) -> int:
    return record["grown"] - record["result_bytes"]


def test_head_activations_memory_is_the_result_plus_one_batch(tmp_path):
    small = _measure("heads", 16, 0, tmp_path / "small")
    big = _measure("heads", 96, 1, tmp_path / "big")
    assert big["detached"] and big["owns_storage"]
    assert big["result_bytes"] > small["result_bytes"]
    assert _overhead(big) <= max(_overhead(small), 0) + SLACK, (_overhead(small) / 2**20, _overhead(big) / 2**20)


def test_collect_memory_does_not_grow_with_the_number_of_shards(tmp_path):
    small = _measure("collect", 16, 0, tmp_path / "small")
    big = _measure("collect", 64, 1, tmp_path / "big")
    assert big["shards"] == 8 and big["detached"]
    assert _overhead(big) <= max(_overhead(small), 0) + SLACK, (_overhead(small) / 2**20, _overhead(big) / 2**20)

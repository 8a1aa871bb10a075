"""Subprocess of the memory measure: peak RSS and disk bytes of ``hpr.activations.collect``.

Run as ``python -m bench.memory_worker CKPT_DIR OUT_DIR N_QUESTIONS PER_SHARD BATCH fp16|fp32 PRIMER``;
prints one JSON line. RSS is sampled by a thread every millisecond (psutil), since ``ru_maxrss`` would
report the peak of model loading rather than of the collection.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def main(argv: list[str]) -> dict:
    import psutil
    import torch

    from bench.models import questions
    from hpr import activations
    from hpr.data import QA_PRIMER, PromptFormat, split_ids
    from hpr.models import load_model
    from hpr.scoring import encode_all, pad_batch, pad_token_id

    ckpt, out, n_q, per_shard, batch, store, primer = argv
    n_q, per_shard, batch = int(n_q), int(per_shard), int(batch)
    fmt = PromptFormat(primer=QA_PRIMER if primer == "primer" else "")
    qs = questions()
    train = set(split_ids([q.id for q in qs])["train"])
    qs = [q for q in qs if q.id in train][:n_q]
    model = load_model(ckpt, device="cpu")
    proc = psutil.Process()

    # "One batch": the RSS growth of collecting the largest batch once (what answer_activations runs).
    pairs = [(fmt.context(q), fmt.continuation(c.text)) for q in qs for c in q.mc2]
    enc = encode_all(model, pairs)
    biggest = sorted(range(len(enc)), key=lambda i: -len(enc[i].tokens))[:batch]
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    def measure(fn):
        import gc
        gc.collect()
        before = proc.memory_info().rss
        peak[0] = before
        stop.clear()
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        result = fn()
        stop.set()
        t.join()
        return result, peak[0] - before

    big_pairs = [pairs[i] for i in biggest]
    activations.answer_activations(model, big_pairs, batch)  # warm the allocator once
    _, batch_bytes = measure(lambda: activations.answer_activations(model, big_pairs, batch))
    ids, _ = pad_batch([enc[i] for i in biggest], pad_token_id(model))

    folder = Path(out)
    result, collect_bytes = measure(lambda: activations.collect(model, qs, fmt, folder, questions_per_shard=per_shard,
                                                                batch_size=batch, fp16=store == "fp16"))
    shards = sorted(folder.glob("shard-*.safetensors"))
    sizes = [p.stat().st_size for p in shards]
    tokens_per_shard = []
    from safetensors import safe_open
    for p in shards:
        with safe_open(p, framework="pt") as f:
            tokens_per_shard.append(f.get_slice("acts").get_shape()[0])
    row_bytes = model.cfg.n_layers * model.cfg.d_model * (2 if store == "fp16" else 4)  # one answer token, every layer
    return {
        "store": store, "questions": len(qs), "answers": len(pairs), "shards": len(shards),
        "disk_bytes": sum(sizes), "largest_shard_bytes": max(tokens_per_shard) * row_bytes,
        "result_f32_bytes": int(result.acts.numel() * 4), "batch_peak_bytes": int(batch_bytes),
        "collect_peak_bytes": int(collect_bytes), "batch_shape": list(ids.shape), "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))

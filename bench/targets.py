"""The bench's targets, as data: what each measurement must reach. ``bench.report.judge`` checks them.

Each record is keyed by the ``target`` a measurement names and holds ``text`` (the target as the table
shows it) and ``checks``, all of which must hold. A check ``reads`` one measured quantity (``value`` is the
table's value; the others are what the measure reports beside it) and bounds it by ``at_least`` or
``at_most``, or requires it to be true (``is``). A bound may also be relative to another measured quantity,
``{"times": f, "of": quantity, "plus": c}`` (f x that quantity + c); ``shown_as`` then names the detail
entries the bound (to 0.1) and the outcome are written to, since they are not in the measure's own details.
"""

# Every other editor's forward overhead: a looser bound than HPR's (below).
_EDIT_OVERHEAD = {
    f"forward {name}": {"text": "<= 1.05", "checks": [{"reads": "value", "at_most": 1.05}]}
    for name in ("iti15", "caa", "sea", "sadi")
}

TARGETS = {
    # Forward pass with the edit / without (in-call estimate, every position edited).
    "forward hpr": {"text": "<= 1.03", "checks": [{"reads": "value", "at_most": 1.03}]},
    **_EDIT_OVERHEAD,
    # Generation: tokens/s with HPR over tokens/s without.
    "generation": {"text": ">= 0.97", "checks": [{"reads": "value", "at_least": 0.97}]},
    # Activation caching (collect) throughput over a plain forward's.
    "caching": {"text": ">= 0.90", "checks": [{"reads": "value", "at_least": 0.90}]},
    # HPR training, all layers batched over the per-layer loop; the loop clips gradients per layer, hence
    # a tolerance on the final loss rather than equality.
    "training": {
        "text": ">= 5x, loss within 2%",
        "checks": [{"reads": "value", "at_least": 5}, {"reads": "loss_rel_diff", "at_most": 0.02}],
    },
    # MC scoring batched over one sequence at a time; both must give the same scores.
    "scoring": {
        "text": ">= 5x, |diff| <= 1e-4",
        "checks": [{"reads": "value", "at_least": 5}, {"reads": "max_abs_diff", "at_most": 1e-4}],
    },
    # fp16 shards take half the disk of fp32; caching's peak RSS stays within one batch + one shard + the
    # result (``rss_within_bound``: measured for both stores).
    "activation store": {
        "text": "~0.5 disk; RSS <= batch + shard + result",
        "checks": [
            {"reads": "value", "at_least": 0.45},
            {"reads": "value", "at_most": 0.55},
            {"reads": "rss_within_bound", "is": True},
        ],
    },
    # Real model shape: collection, every answer run whole over shared contexts; same activations.
    "realshape collection": {
        "text": ">= 5x, |diff| <= 1e-4",
        "checks": [{"reads": "value", "at_least": 5}, {"reads": "max_abs_diff", "at_most": 1e-4}],
    },
    # Real model shape: scoring, each question's context once over the primer shared too; same scores.
    "realshape scoring": {
        "text": ">= 2x, |diff| <= 1e-4",
        "checks": [{"reads": "value", "at_least": 2}, {"reads": "max_abs_diff", "at_most": 1e-4}],
    },
    # Real model shape: greedy generation batched over the shared primer against one prompt at a time; the
    # same tokens for every prompt.
    "realshape generation": {
        "text": ">= 3x, same tokens",
        "checks": [{"reads": "value", "at_least": 3}, {"reads": "same_tokens", "is": True}],
    },
    # Real model shape: collect's peak RSS on N and 2N questions stays within batch + shard + result, and
    # the memory beyond the result (``over``, in MB) does not grow with the shard count: 1.25x plus 16 MB.
    "realshape peak RSS": {
        "text": "peak <= batch + shard + result (N, 2N q); over(2N) <= 1.25 over(N) + 16 MB, "
        "over = max(writing peak, loading peak - result)",
        "checks": [
            {"reads": "rss_within_bound", "is": True},
            {
                "reads": "overhead_2n_mb",
                "at_most": {"times": 1.25, "of": "overhead_n_mb", "plus": 16},
                "shown_as": ["overhead_bound_mb", "overhead_flat"],
            },
        ],
    },
}

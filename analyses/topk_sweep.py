"""Paper Fig. 6: MC1/MC2 as HPR edits the top-k layers (ranked by val probe accuracy), k = 1 .. n_layers
(or the k values of ``--topk``).

The run itself picks k on validation; this sweep shows both splits, so the choice can be checked.
"""

import pandas as pd

from hpr import evaluate, figures, measurements, metrics
from hpr.editors.hpr import HPREditor, top_k_layers


def make(run: measurements.Run, args) -> dict:
    full = run.editor("hpr_all_layers")
    val_acc = run.results["probe_accuracy"]["val"]
    rows = []
    ks = sorted({min(k, len(val_acc)) for k in args.topk}) if args.topk else range(1, len(val_acc) + 1)
    if any(k < 1 for k in ks):
        raise ValueError(f"--topk values must be >= 1, got {args.topk}")
    for k in ks:
        layers = top_k_layers(val_acc, k)
        editor = HPREditor(type(full.config)(layers=layers), full.tensors, full.d_model, full.n_layers)
        for split in ("val", "test"):
            preds = evaluate.predictions(run.model, run.questions(split), run.fmt, "hpr", editor)
            row = metrics.summarize(metrics.question_scores(preds))["hpr"]
            rows.append(
                {"k": k, "layers": " ".join(map(str, layers)), "split": split, "mc1": row["mc1"], "mc2": row["mc2"]}
            )
    df = pd.DataFrame(rows)
    base = run.results["methods"]["base"]
    fig = figures.topk_sweep(df, {"mc1": base["mc1"], "mc2": base["mc2"]})  # both splits; base is test's
    return {"figures": {"topk_sweep": fig}, "tables": {"topk_sweep": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

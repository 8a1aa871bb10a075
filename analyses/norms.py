"""Paper Figs. 3 and 4: per-layer activation norms at resid_post on the test split.

Fig. 3: base model, every true vs every false answer token. Fig. 4: base vs ITI15, ITI200 and HPR (or --methods)
at the true answers' tokens. Boxes use exact quantiles over all tokens.
"""

from hpr import activations, figures, measurements

PAPER_METHODS = ("base", "iti15", "iti200", "hpr")


def make(run: measurements.Run, args) -> dict:
    pos_neg = measurements.true_false_norm_quantiles(activations.load(run.folder / "activations" / "test"))
    methods = args.methods or [m for m in PAPER_METHODS if m in run.methods]
    by_method = measurements.norm_quantiles(run.model, run.questions("test"), run.fmt, run.editors(methods))
    change = measurements.norm_change_frame(run.results)
    return {
        "figures": {
            "norms_true_vs_false": figures.norm_boxes(pos_neg, "Base model: norms of true vs false answer tokens"),
            "norms_by_method": figures.norm_boxes(by_method, "Activation norms under each method (test prompts)"),
        },
        "tables": {
            "norms_by_method": by_method,
            "norm_change_vs_base": change.pivot(
                index="method", columns="layer", values="relative_norm_change"
            ).reset_index(),
        },
    }


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

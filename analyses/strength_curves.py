"""Beyond the paper: each method's strength curve on the validation split (MC1, MC2, KL on neutral text, and
the truthfulness of its greedy answers), and the trade-off figure: MC1 gain against KL, one curve per method.

Strengths (hpr.strength.STRENGTHS): ITI alpha, CAA multiplier, Diff scale, SADI delta, and for HPR a scale on
the rotation angle (our addition; 0 = unedited, 1 = as trained). Methods without a strength (SEA, LoRA,
representation tuning) have no curve. Validation only: nothing here touches the test split. Greedy answers
(BLEU/ROUGE-L acc, non-answers, degenerate loops) are generated for the first --gen-questions val questions at
every strength (0: none), with the run's answer length.
"""

from hpr import capability, evaluate, figures, measurements, metrics, strength
from hpr.sources import neutral_passages


def make(run: measurements.Run, args) -> dict:
    editors = {m: run.editor(m) for m in (args.methods or run.methods) if m != "base"}
    editors = {m: e for m, e in editors.items() if e is not None and e.strength is not None}
    if not editors:
        return {}
    cfg = run.config
    passages = neutral_passages(
        cfg["model"], args.neutral_text or cfg.get("neutral_text"), cfg.get("neutral_passages", 32)
    )
    neutral = capability.encode_passages(run.model, passages, cfg.get("neutral_tokens", 64))
    val = run.questions("val")
    base = metrics.summarize(metrics.question_scores(evaluate.predictions(run.model, val, run.fmt, "base", None)))
    asked = val[: args.gen_questions]
    score = strength.answers_scorer(run.model, asked, run.fmt, cfg.get("gen_max_new_tokens", 64)) if asked else None
    df = strength.curves(run.model, val, run.fmt, editors, neutral, answers_score=score, progress=True)
    out = {f"strength_{m}": figures.strength_curves(df, m) for m in editors}
    out["tradeoff"] = figures.tradeoff(df, base["base"]["mc1"])
    return {"figures": out, "tables": {"strength_curves": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

"""Beyond the paper: capability retention on neutral text, per method.

Mean KL(base || edited) of the next-token distribution and the perplexity change against the base model. A run
measures both as a step of its own (results.json "capability"); this script shows them, and measures again only
for a run folder written before that step or when given --neutral-text FILE.
"""

import pandas as pd

from hpr import figures, measurements


def make(run: measurements.Run, args) -> dict:
    methods = args.methods or run.methods
    recorded = run.results.get("capability", {})
    if args.neutral_text is None and all(m in recorded for m in methods):
        df = pd.DataFrame([{"method": m, **recorded[m]} for m in methods])
    else:
        texts = measurements.neutral_texts(run.config["model"], path=args.neutral_text)
        df = measurements.capability(run.model, texts, run.editors(methods))
    return {"figures": {"capability": figures.capability_bars(df)}, "tables": {"capability": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

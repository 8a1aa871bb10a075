"""Beyond the paper: capability retention on neutral text, per method.

Mean KL(base || edited) of the next-token distribution and the perplexity change against the base model.
Neutral text: --neutral-text FILE, or for the toy world held-out documents of its corpus.
"""

from hpr import figures, measurements


def make(run: measurements.Run, args) -> dict:
    texts = measurements.neutral_texts(run.config["model"], path=args.neutral_text)
    df = measurements.capability(run.model, texts, run.editors(args.methods))
    return {"figures": {"capability": figures.capability_bars(df)}, "tables": {"capability": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

"""Paper Table 1: MC1 and MC2 (± standard error) of every method on the test split, with a bar chart."""

from hpr import figures, measurements


def make(run: measurements.Run, args) -> dict:
    df = measurements.mc_frame(run.results)
    if args.methods:
        df = df[df["method"].isin(args.methods)]
    return {"figures": {"mc_scores": figures.mc_bars(df)}, "tables": {"mc_scores": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

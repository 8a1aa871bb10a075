"""Paper Table 3: per-question MC1 flips of every method against the base model (fractions of test questions)."""

from hpr import measurements


def make(run: measurements.Run, args) -> dict:
    df = measurements.flip_frame(run.results)
    if args.methods:
        df = df[df["method"].isin(args.methods)]
    return {"tables": {"flip_rates": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

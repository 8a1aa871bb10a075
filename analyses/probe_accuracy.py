"""Paper Fig. 2: per-layer probe accuracy on the val and test splits, with HPR's selected layers starred."""

from hpr import figures, measurements


def make(run: measurements.Run, args) -> dict:
    df = measurements.probe_frame(run.results)
    fig = figures.probe_accuracy(df, run.results["selected_layers"])
    table = df.pivot(index="layer", columns="split", values="accuracy").reset_index()
    return {"figures": {"probe_accuracy": fig}, "tables": {"probe_accuracy": table}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

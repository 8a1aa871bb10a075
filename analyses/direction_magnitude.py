"""Beyond the paper: what each edit does to direction and magnitude, at HPR's last edited layer.

Per token: cos(h_edited, h_base) against ||h_edited|| / ||h_base|| for every method; and the histogram of HPR's
predicted angle theta against the reflection angle gamma for the test tokens it edits.
"""

from hpr import figures, measurements


def make(run: measurements.Run, args) -> dict:
    layer = max(run.results["selected_layers"])
    editors = run.editors(args.methods)
    samples = measurements.direction_magnitude(run.model, run.questions("test"), run.fmt, editors, layer)
    angles = measurements.split_hpr_angles(run.editor("hpr"), run.folder / "activations" / "test")
    summary = (
        samples.groupby("method", sort=False)
        .agg(
            cosine_mean=("cosine", "mean"),
            norm_ratio_mean=("norm_ratio", "mean"),
            norm_ratio_max_dev=("norm_ratio", lambda r: float((r - 1).abs().max())),
        )
        .reset_index()
    )
    return {
        "figures": {
            "direction_magnitude": figures.direction_magnitude(samples),
            "hpr_angles": figures.angle_histogram(angles),
        },
        "tables": {"direction_magnitude": summary},
    }


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

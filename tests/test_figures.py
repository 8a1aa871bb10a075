"""Figure builders on small hand-made frames, table export, and one real export when a browser exists."""

import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from hpr import figures, measurements


def _boxes(groups=("base", "hpr"), layers=2):
    rows = []
    for g in groups:
        for layer in range(layers):
            rows.append({"group": g, "layer": layer, **measurements.box_stats(torch.arange(1.0, 101.0) + layer)})
    return pd.DataFrame(rows)


def test_probe_accuracy_figure():
    df = pd.DataFrame(
        {"layer": [0, 1, 2] * 2, "split": ["val"] * 3 + ["test"] * 3, "accuracy": [0.6, 0.8, 0.7, 0.55, 0.75, 0.7]}
    )
    fig = figures.probe_accuracy(df, selected_layers=[1])
    names = [t.name for t in fig.data]
    assert names == ["val", "test", "selected"]
    assert list(fig.data[2].x) == [1] and list(fig.data[2].y) == [0.8]
    (chance,) = fig.layout.shapes
    assert chance.y0 == 0.5 and chance.line.width > 0  # the template's default width, 0, drew no line
    low, high = fig.layout.yaxis.range
    assert low < 0.5 and 0.8 < high < 0.9  # fitted to the data, chance in view
    assert list(fig.layout.xaxis.range) == [-0.5, 2.5]  # no ticks at layers -1 or 3
    flat = figures.probe_accuracy(df.assign(accuracy=[0.5, 0.62, 0.55, 0.52, 0.6, 0.58]))
    assert flat.layout.yaxis.range[1] < 0.7  # a model whose probes reach 0.62 is not squashed into 0.4-1.02
    assert fig.layout.xaxis.title.text.startswith("layer") and fig.layout.yaxis.title.text == "accuracy"


def test_norm_boxes_one_box_per_group_and_layer():
    fig = figures.norm_boxes(_boxes(("base", "iti15", "hpr"), layers=4))
    assert [t.name for t in fig.data] == ["base", "iti15", "hpr"]
    assert all(len(t.q1) == 4 and list(t.x) == ["L0", "L1", "L2", "L3"] for t in fig.data)
    assert fig.data[0].marker.color == figures.color("base")  # one colour per method in every figure
    assert "norm" in fig.layout.yaxis.title.text and fig.layout.boxmode == "group"
    assert fig.layout.yaxis.type == "linear"  # medians of one scale read on a linear axis
    wide = _boxes(("base", "iti200"), layers=30)
    wide.loc[wide["group"] == "iti200", ["q1", "median", "q3", "upperfence"]] *= 40  # ITI200's ~3,400
    big = figures.norm_boxes(wide)
    assert big.layout.yaxis.type == "log" and "log scale" in big.layout.yaxis.title.text
    assert big.layout.width > 760  # 30 layers x 2 boxes get room


def test_box_stats_are_exact_tukey_statistics():
    values = torch.cat([torch.arange(1.0, 101.0), torch.tensor([1000.0])])  # one outlier
    stats = measurements.box_stats(values)
    assert stats["median"] == 51.0 and stats["n"] == 101
    assert stats["q1"] == 26.0 and stats["q3"] == 76.0
    assert stats["upperfence"] == 100.0 and stats["lowerfence"] == 1.0  # the outlier is beyond the whisker


def test_mc_bars_topk_and_other_builders():
    mc = pd.DataFrame(
        {
            "method": ["base", "hpr"],
            "mc1": [0.3, 0.5],
            "mc1_stderr": [0.02, 0.03],
            "mc2": [0.4, 0.6],
            "mc2_stderr": [0.02, 0.02],
        }
    )
    fig = figures.mc_bars(mc)
    assert [t.name for t in fig.data] == ["MC1", "MC2"] and list(fig.data[0].error_y.array) == [0.02, 0.03]
    assert list(fig.data[0].marker.color) == [figures.color("base"), figures.color("hpr")]
    sweep = figures.topk_sweep(
        pd.DataFrame({"k": [2, 1], "mc1": [0.5, 0.4], "mc2": [0.6, 0.5]}), {"mc1": 0.3, "mc2": 0.45}
    )
    assert list(sweep.data[0].x) == [1, 2] and len(sweep.layout.shapes) == 2  # base lines
    # drawn: simple_white's shape default is a line width of 0, which shows the labels only
    assert all(shape.line.width and shape.line.width > 0 for shape in sweep.layout.shapes)
    both = figures.topk_sweep(
        pd.DataFrame({"k": [1, 1], "split": ["test", "val"], "mc1": [0.4, 0.5], "mc2": [0.5, 0.6]}),
        {"mc1": 0.3, "mc2": 0.45},
    )
    assert [t.name for t in both.data] == ["HPR MC1 (val)", "HPR MC1 (test)", "HPR MC2 (val)", "HPR MC2 (test)"]
    dm = figures.direction_magnitude(
        pd.DataFrame({"method": ["hpr", "hpr", "iti15"], "cosine": [0.9, 0.8, 0.5], "norm_ratio": [1.0, 1.0, 2.0]})
    )
    assert [t.name for t in dm.data] == ["hpr", "iti15"] and dm.layout.yaxis.type == "log"
    angles = figures.angle_histogram(pd.DataFrame({"theta": [0.1, 0.2], "gamma": [0.3, 0.4]}))
    assert len(angles.data) == 2 and angles.layout.xaxis.title.text.startswith("angle")
    cap = figures.capability_bars(pd.DataFrame({"method": ["base", "hpr"], "kl": [0.0, 0.1]}))
    assert list(cap.data[0].y) == [0.0, 0.1]
    with pytest.raises(ValueError, match="needs columns"):
        figures.mc_bars(mc.drop(columns="mc2"))


def test_unknown_methods_get_a_stable_palette_colour():
    assert figures.color("my_method") == figures.color("my_method") in figures.OKABE_ITO


def test_tables_export_to_csv_markdown_and_booktabs_latex(tmp_path):
    df = pd.DataFrame({"method": ["base", "hpr_no_angle"], "mc1": [0.31234, 0.5]})
    paths = figures.export_table(df, tmp_path, "mc_scores", caption="MC scores")
    assert [p.suffix for p in paths] == [".csv", ".md", ".tex"]
    assert pd.read_csv(paths[0]).equals(df)
    assert "| hpr_no_angle |" in paths[1].read_text() and "0.312" in paths[1].read_text()
    tex = paths[2].read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "hpr\\_no\\_angle" in tex
    assert "\\caption{MC scores}" in tex and "\\begin{tabular}{lr}" in tex  # numbers right-aligned


def test_table_exports_show_mean_plus_minus_stderr_and_keep_raw_columns_in_csv(tmp_path):
    df = pd.DataFrame({"method": ["base", "a&b"], "mc1": [0.31234, 0.5], "mc1_stderr": [0.0214, 0.02], "n": [30, 30]})
    csv, md, tex = figures.export_table(df, tmp_path, "mc_scores")
    assert pd.read_csv(csv).equals(df)  # every column, unrounded
    assert "0.312 ± 0.021" in md.read_text() and "stderr" not in md.read_text()
    text = tex.read_text()
    assert "0.312 $\\pm$ 0.021" in text and "a\\&b" in text and "stderr" not in text
    assert "\\begin{tabular}{lrr}" in text and "\\caption{Mc scores}" in text  # a caption from the name


def test_a_scale_that_is_not_positive_is_refused(tmp_path):
    with pytest.raises(ValueError, match="scale must be positive"):
        figures.export_figures({"f": go.Figure()}, tmp_path, formats=("png",), html=False, scale=0)


def test_html_export_needs_no_browser(tmp_path):
    fig = figures.mc_bars(
        pd.DataFrame({"method": ["base"], "mc1": [0.3], "mc1_stderr": [0.01], "mc2": [0.4], "mc2_stderr": [0.01]})
    )
    paths = figures.export_figures({"mc": fig}, tmp_path, formats=())
    assert paths == [tmp_path / "mc.html"] and "plotly" in paths[0].read_text()[:5000].lower()


@pytest.mark.skipif(
    figures.browser_available() is None,
    reason="no Chromium on PATH: static export needs one (apt-get install chromium)",
)
def test_static_export_smoke(tmp_path):
    fig = figures.probe_accuracy(pd.DataFrame({"layer": [0, 1], "split": ["val", "val"], "accuracy": [0.6, 0.7]}))
    paths = figures.export_figures({"probe": fig}, tmp_path)
    assert {p.suffix for p in paths} == {".html", ".png", ".svg", ".pdf"}
    png = (tmp_path / "probe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (1400, 1000)  # publication scale: twice plotly's 700x500
    assert (tmp_path / "probe.pdf").read_bytes()[:4] == b"%PDF"


def test_group_colours_are_no_methods_colours():
    from hpr.editors import default_labels

    methods = {figures.color(label) for label in default_labels()} | {figures.color("base")}
    assert not methods & set(figures.GROUP_COLORS.values())


def test_tables_with_numbers_for_column_names_export(tmp_path):
    pivot = pd.DataFrame({"split": ["val", "test"], 0: [0.61, 0.58], 1: [0.7, 0.66]})  # a layer per column
    md = figures.export_table(pivot, tmp_path, "probe_accuracy")[1].read_text()
    assert "0.610" in md and "0.660" in md

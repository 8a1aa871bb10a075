"""Plotly figure builders and paper export. Builders take tidy DataFrames and compute nothing themselves
(statistics come from :mod:`hpr.measurements`); each returns a ``plotly.graph_objects.Figure``.

Every method has one colour in every figure (Okabe-Ito, a colour-blind-safe palette). Export writes PNG,
SVG and PDF through one kaleido session for a whole batch; tables go to CSV, markdown and LaTeX (booktabs).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

# Okabe & Ito (2008), colour-blind safe; black is kept for the unedited model.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999")
# The ends of ColorBrewer's PRGn (colour-blind safe), kept apart from every method's colour: the Okabe-Ito
# green and vermilion they were before are ITI200's and CAA's.
GROUP_COLORS = {"true answers": "#1B7837", "false answers": "#762A83"}
FIGURE_FORMATS = ("png", "svg", "pdf")
TABLE_FORMATS = ("csv", "md", "tex")
PNG_SCALE = 2.0  # publication scale: a PNG at twice the figure's size
_LAYOUT = dict(
    template="simple_white",
    font=dict(family="Arial", size=13),
    width=760,
    height=430,
    legend=dict(title=None),
    margin=dict(l=70, r=20, t=50, b=60),
)


def reference_line(fig: go.Figure, y: float, line_color: str, dash: str, label: str) -> None:
    """A horizontal reference line with its label. The width is explicit: the ``simple_white`` template
    draws shapes with a line width of 0, so a line without one shows only its label (in the app and in
    every export)."""
    fig.add_hline(y=y, line=dict(color=line_color, dash=dash, width=1.5), annotation_text=label)


def color(name: str) -> str:
    """The colour of a method (each registers its own: :mod:`hpr.editors.registry`) or group in every figure;
    unknown names get a stable palette colour."""
    from hpr.editors.registry import colour_of

    return colour_of(name) or GROUP_COLORS.get(name) or OKABE_ITO[sum(map(ord, name)) % len(OKABE_ITO)]


def _layout(fig: go.Figure, title: str, x: str, y: str, **extra) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, **{**_LAYOUT, **extra})  # extra wins
    return fig


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}; got {list(df.columns)}")


# ----------------------------------------------------------------------------------------------- figures


def probe_accuracy(df: pd.DataFrame, selected_layers: Sequence[int] = ()) -> go.Figure:
    """Per-layer probe accuracy (paper Fig. 2). ``df``: ``layer, split, accuracy``; selected layers starred."""
    _require(df, ("layer", "split", "accuracy"), "probe_accuracy")
    fig = go.Figure()
    for i, (split, part) in enumerate(df.groupby("split", sort=False)):
        part = part.sort_values("layer")
        fig.add_trace(
            go.Scatter(
                x=part["layer"],
                y=part["accuracy"],
                mode="lines+markers",
                name=split,
                line=dict(color=OKABE_ITO[(4, 5, 2)[i % 3]], dash=("solid", "dash", "dot")[i % 3]),
            )
        )
    if len(selected_layers):
        chosen = df[df["layer"].isin(selected_layers) & (df["split"] == df["split"].iloc[0])]
        fig.add_trace(
            go.Scatter(
                x=chosen["layer"],
                y=chosen["accuracy"],
                mode="markers",
                name="selected",
                marker=dict(symbol="star", size=14, color="#000000"),
            )
        )
    reference_line(fig, 0.5, "#999999", "dot", "chance")
    # Ranges from the data (with chance in view): a fixed 0.4-1.02 squashed a model whose probes reach 0.62,
    # and autorange put ticks at layers -1 and n_layers.
    low, high = min(0.5, float(df["accuracy"].min())), max(0.5, float(df["accuracy"].max()))
    pad = max(0.02, 0.08 * (high - low))
    first, last = int(df["layer"].min()), int(df["layer"].max())
    return _layout(
        fig,
        "Probe accuracy per layer",
        "layer (0-based block)",
        "accuracy",
        yaxis_range=[low - pad, min(high + pad, 1.02)],
        xaxis=dict(range=[first - 0.5, last + 0.5], dtick=1 if last - first < 16 else 2),
    )


def norm_boxes(df: pd.DataFrame, title: str = "Activation norms per layer") -> go.Figure:
    """Box plots of per-token ``||h||`` at ``hook_resid_post`` per layer and group (paper Figs. 3 and 4).

    ``df``: ``layer, group, q1, median, q3, lowerfence, upperfence`` (exact quantiles from
    :func:`hpr.measurements.norm_quantiles`, so every token counts and the figure stays small); one box per row.
    """
    _require(df, ("layer", "group", "q1", "median", "q3", "lowerfence", "upperfence"), "norm_boxes")
    fig = go.Figure()
    for group, part in df.groupby("group", sort=False):
        part = part.sort_values("layer")
        fig.add_trace(
            go.Box(
                name=str(group),
                x=[f"L{l}" for l in part["layer"]],
                q1=part["q1"],
                median=part["median"],
                q3=part["q3"],
                lowerfence=part["lowerfence"],
                upperfence=part["upperfence"],
                marker_color=color(str(group)),
                mean=part["mean"] if "mean" in part else None,
                boxpoints=False,
            )
        )
    # One edit that multiplies norms (ITI alpha 200 reaches ~3,400 on SmolLM2) flattens every other box on a
    # linear axis: when the largest median is over 20x the smallest, the axis is logarithmic. Wide enough for
    # every box of many layers.
    low, high = float(df["median"].min()), float(df["median"].max())
    log = low > 0 and high / low > 20 and float(df["lowerfence"].min()) > 0
    n_layers, n_groups = df["layer"].nunique(), df["group"].nunique()
    return _layout(
        fig,
        title,
        "layer",
        "‖h‖ at resid_post (L2 norm" + (", log scale)" if log else ")"),
        boxmode="group",
        yaxis_type="log" if log else "linear",
        width=max(760, min(3000, 80 + n_layers * (10 * n_groups + 8))),
    )


def mc_bars(df: pd.DataFrame) -> go.Figure:
    """MC1 and MC2 per method with ± 1 standard error (Table 1 as a chart). ``df``: one row per method."""
    _require(df, ("method", "mc1", "mc1_stderr", "mc2", "mc2_stderr"), "mc_bars")
    fig = go.Figure()
    for metric, pattern in (("mc1", ""), ("mc2", "/")):
        fig.add_trace(
            go.Bar(
                name=metric.upper(),
                x=df["method"],
                y=df[metric],
                error_y=dict(type="data", array=df[f"{metric}_stderr"]),
                marker=dict(
                    color=[color(m) for m in df["method"]], pattern_shape=pattern, line=dict(color="#000000", width=1)
                ),
            )
        )
    return _layout(
        fig,
        "TruthfulQA-style multiple choice (test split)",
        "method",
        "score (± 1 s.e.)",
        barmode="group",
        yaxis_range=[0, 1],
    )


def topk_sweep(df: pd.DataFrame, base: Mapping[str, float]) -> go.Figure:
    """MC1/MC2 as the number of HPR-edited layers grows (paper Fig. 6). ``df``: ``k, mc1, mc2``, and
    optionally ``split`` (one line per split and metric: test solid markers, val open and fainter). ``base``:
    the unedited model's scores (a run records them on the test split)."""
    _require(df, ("k", "mc1", "mc2"), "topk_sweep")
    df = df.sort_values("k")
    parts = list(df.groupby("split", sort=False)) if "split" in df.columns else [(None, df)]
    parts.sort(key=lambda part: part[0] != "val")  # val first, so test is drawn on top
    fig = go.Figure()
    for metric, dash in (("mc1", "solid"), ("mc2", "dash")):
        for split, part in parts:
            faint = split == "val"
            fig.add_trace(
                go.Scatter(
                    x=part["k"],
                    y=part[metric],
                    mode="lines+markers",
                    name=f"HPR {metric.upper()}" + (f" ({split})" if split else ""),
                    line=dict(color=color("hpr"), dash=dash),
                    marker=dict(symbol="circle-open" if faint else "circle"),
                    opacity=0.55 if faint else 1.0,
                )
            )
        reference_line(fig, base[metric], color("base"), dash, f"base {metric.upper()}")
    return _layout(
        fig, "HPR: edited layers (top-k by validation probe)", "k (edited layers)", "score", xaxis=dict(dtick=1)
    )


def direction_magnitude(df: pd.DataFrame) -> go.Figure:
    """Per token, the cosine of edited and base activations against their norm ratio, one colour per method.

    ``df``: ``method, cosine, norm_ratio`` (a sample of tokens at an edited layer). HPR stays on
    ``norm_ratio = 1`` and moves in direction only; additive edits move along both axes.
    """
    _require(df, ("method", "cosine", "norm_ratio"), "direction_magnitude")
    fig = go.Figure()
    for method, part in df.groupby("method", sort=False):
        fig.add_trace(
            go.Scattergl(
                x=part["cosine"],
                y=part["norm_ratio"],
                mode="markers",
                name=str(method),
                marker=dict(color=color(str(method)), size=4, opacity=0.5),
            )
        )
    return _layout(
        fig, "Direction vs magnitude of each edit", "cos(h_edited, h_base)", "‖h_edited‖ / ‖h_base‖", yaxis_type="log"
    )


def angle_histogram(df: pd.DataFrame) -> go.Figure:
    """HPR's predicted rotation angle theta against the reflection angle gamma, for edited tokens.

    ``df``: ``theta, gamma`` in radians.
    """
    _require(df, ("theta", "gamma"), "angle_histogram")
    fig = go.Figure()
    for name, c in (("gamma", color("hpr_no_angle")), ("theta", color("hpr"))):
        fig.add_trace(
            go.Histogram(
                x=df[name],
                name={"gamma": "γ (reflection)", "theta": "θ (predicted)"}[name],
                marker_color=c,
                opacity=0.7,
                nbinsx=40,
            )
        )
    return _layout(fig, "HPR angles of edited tokens", "angle (radians)", "tokens", barmode="overlay")


def capability_bars(df: pd.DataFrame) -> go.Figure:
    """KL from the base next-token distribution on neutral text, per method. ``df``: ``method, kl``."""
    _require(df, ("method", "kl"), "capability_bars")
    fig = go.Figure(go.Bar(x=df["method"], y=df["kl"], marker_color=[color(m) for m in df["method"]], showlegend=False))
    return _layout(fig, "Capability retention on neutral text", "method", "mean KL(base ‖ edited) (nats/token)")


def strength_curves(df: pd.DataFrame, method: str, metrics: Sequence[str] | None = None) -> go.Figure:
    """One method's curve: each metric of ``df`` (``method, strength, fitted`` and the metric columns, from
    :func:`hpr.strength.curves`) against its strength; the fitted strength circled. KL on its own axis. By
    default MC1, MC2, KL and, where ``df`` has them, BLEU acc and ROUGE-L acc among informative answers."""
    from plotly.subplots import make_subplots

    if metrics is None:
        answers = [c for c in ("bleu_acc", "rougeL_acc_informative") if c in df.columns]
        metrics = ("mc1", "mc2", *answers, "kl")

    _require(df, ("method", "strength", "fitted", *metrics), "strength_curves")
    part = df[df["method"] == method].sort_values("strength")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    dashes = ("solid", "dash", "dot", "dashdot")
    for i, metric in enumerate(m for m in metrics if m != "kl"):
        fig.add_trace(
            go.Scatter(
                x=part["strength"],
                y=part[metric],
                name=metric.replace("_", " "),
                mode="lines+markers",
                line=dict(color=color(method), dash=dashes[i % len(dashes)]),
            )
        )
    if "kl" in metrics:
        fig.add_trace(
            go.Scatter(
                x=part["strength"],
                y=part["kl"],
                name="KL (right axis)",
                mode="lines+markers",
                line=dict(color="#000000", dash="dot"),
            ),
            secondary_y=True,
        )
        fig.update_yaxes(title_text="KL(base ‖ edited), nats/token", secondary_y=True, rangemode="tozero")
    fitted = part[part["fitted"]]
    for metric in (m for m in metrics if m != "kl"):
        fig.add_trace(
            go.Scatter(
                x=fitted["strength"],
                y=fitted[metric],
                mode="markers",
                marker=dict(symbol="circle-open", size=16, color="#000000", line=dict(width=2)),
                name="fitted",
                showlegend=metric == metrics[0],
            )
        )
    return _layout(fig, f"{method}: strength on the validation split", "strength", "score (val)")


def tradeoff(df: pd.DataFrame, base_mc1: float) -> go.Figure:
    """MC1 gain over the base model against KL(base ‖ edited), one curve per method through its strengths
    (``df`` as :func:`strength_curves`); each fitted strength is a filled marker. Up and to the left is
    better: more truthfulness for less change on unrelated text. KL is on a log axis, so strength 0 (the base
    model itself, at KL 0 and gain 0 for every method) is left out."""
    _require(df, ("method", "strength", "fitted", "mc1", "kl"), "tradeoff")
    fig = go.Figure()
    for method, part in df[df["kl"] > 0].groupby("method", sort=False):
        part = part.sort_values("strength")
        fig.add_trace(
            go.Scatter(
                x=part["kl"],
                y=part["mc1"] - base_mc1,
                mode="lines+markers",
                name=str(method),
                text=[f"strength {s:g}" for s in part["strength"]],
                line=dict(color=color(str(method))),
                marker=dict(size=[13 if f else 7 for f in part["fitted"]], line=dict(width=1, color="#000000")),
            )
        )
    reference_line(fig, 0, "#999999", "dot", "base")
    fig.update_xaxes(type="log")
    return _layout(
        fig,
        "Truthfulness gained against what it costs (validation)",
        "KL(base ‖ edited), nats/token (log)",
        "MC1 − base MC1",
    )


def edit_region_bars(df: pd.DataFrame) -> go.Figure:
    """Share of tokens HPR edits per selected layer, one bar per region (``df`` from
    :func:`hpr.measurements.hpr_edit_regions`); the mean angle in the hover text."""
    _require(df, ("layer", "region", "edited_share", "mean_theta_deg"), "edit_region_bars")
    fig = go.Figure()
    for region, part in df.groupby("region", sort=False):
        fig.add_trace(
            go.Bar(
                x=[str(layer) for layer in part["layer"]],
                y=part["edited_share"],
                name=str(region),
                text=[f"mean angle {a:.0f}°" for a in part["mean_theta_deg"]],
            )
        )
    fig.update_layout(barmode="group")
    return _layout(fig, "Where HPR edits (test questions)", "layer", "share of tokens edited")


# ------------------------------------------------------------------------------------------------ export


def browser_available() -> str | None:
    """Path of a Chromium/Chrome kaleido can drive, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


NO_BROWSER = (
    "static export (PNG/SVG/PDF) needs kaleido>=1 and a Chromium: on Debian/Ubuntu `apt-get install "
    "chromium`, elsewhere `plotly_get_chrome` (needs network) or any Chrome on PATH. HTML export "
    "works without one."
)


def export_figures(
    figures: Mapping[str, go.Figure],
    folder: Path,
    formats: Sequence[str] = FIGURE_FORMATS,
    html: bool = True,
    scale: float = PNG_SCALE,
) -> list[Path]:
    """Write each figure as ``folder/<name>.<format>`` in one kaleido session; returns the paths written.
    PNGs are drawn at ``scale`` times the figure's size (2: 1400x1000 pixels for plotly's default 700x500).

    HTML (self-contained, plotly.js inlined) needs no browser; static formats raise a RuntimeError naming
    the fix when no browser is found, after the HTML files are written.
    """
    import plotly.io as pio

    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    unknown = sorted(set(formats) - {*FIGURE_FORMATS, "html"})
    if unknown:
        raise ValueError(f"unknown figure format(s) {unknown}: use {', '.join(FIGURE_FORMATS)} (and html)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if html:
        for name, fig in figures.items():
            path = folder / f"{name}.html"
            fig.write_html(path, include_plotlyjs=True)
            written.append(path)
    static = [f for f in formats if f != "html"]
    if static and figures:
        if browser_available() is None:
            raise RuntimeError(NO_BROWSER)
        try:
            import kaleido  # noqa: F401
        except ImportError as e:
            raise RuntimeError(NO_BROWSER) from e
        names = [(name, fmt) for fmt in static for name in figures]
        paths = [folder / f"{name}.{fmt}" for name, fmt in names]
        # one browser for the batch
        pio.write_images(
            [figures[name] for name, _ in names], paths, scale=[scale if f == "png" else 1 for _, f in names]
        )
        written += paths
    return written


STDERR_SUFFIX = "_stderr"
_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {
    "\\": "\\textbackslash{}",
    "~": "\\textasciitilde{}",
    "^": "\\textasciicircum{}",
}


def latex_escaped(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def shown_table(df: pd.DataFrame, float_format: str = "{:.3f}", cell=str, plus_minus: str = "±") -> pd.DataFrame:
    """``df`` as a paper shows it, every cell text: each ``X`` with an ``X_stderr`` beside it becomes one
    ``mean ± s.e.`` column, other floats are formatted; ``cell`` is applied to each piece of text (LaTeX
    escaping) before ``plus_minus`` joins them."""
    shown = pd.DataFrame(index=df.index)
    for col in df.columns:
        if str(col).endswith(STDERR_SUFFIX) and str(col).removesuffix(STDERR_SUFFIX) in df.columns:
            continue
        values = df[col]
        text = values.map(float_format.format) if pd.api.types.is_float_dtype(values) else values.astype(str)
        text = text.map(cell)
        if f"{col}{STDERR_SUFFIX}" in df.columns:
            text = text + f" {plus_minus} " + df[f"{col}{STDERR_SUFFIX}"].map(float_format.format).map(cell)
        shown[col] = text
    return shown


def _caption(name: str) -> str:
    return name.replace("_", " ").capitalize()


def export_table(
    df: pd.DataFrame, folder: Path, name: str, caption: str = "", float_format: str = "{:.3f}"
) -> list[Path]:
    """Write ``folder/<name>.csv`` (every column, unrounded), ``.md`` and ``.tex`` (booktabs); in the last two
    a number with a ``<column>_stderr`` beside it reads ``mean ± s.e.``, numbers are right-aligned, and the
    LaTeX table has a caption (``caption``, or the name's words). Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.{fmt}" for fmt in TABLE_FORMATS]
    df.to_csv(paths[0], index=False)
    numeric = {c for c in df.columns if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])}
    shown = shown_table(df, float_format)
    align = ["right" if c in numeric else "left" for c in shown.columns]
    paths[1].write_text(shown.to_markdown(index=False, colalign=align, disable_numparse=True) + "\n")
    latex = shown_table(df, float_format, cell=latex_escaped, plus_minus="$\\pm$")
    styler = latex.style.hide(axis="index").format_index(escape="latex", axis=1)
    paths[2].write_text(
        styler.to_latex(
            hrules=True,
            column_format="".join("r" if c in numeric else "l" for c in latex.columns),
            caption=caption or _caption(name),
            label=f"tab:{name.replace('_', '-')}",
            position_float="centering",
        )
    )
    return paths

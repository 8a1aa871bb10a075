"""Results: MC1/MC2 table and bars (Table 1), flips against base (Table 3), what each edit costs (KL and
perplexity on neutral text, greedy-answer truthfulness), strength curves and the trade-off figure, the HPR
top-k sweep (Fig. 6)."""

import pandas as pd
import streamlit as st
import workbench as wb

from hpr import figures, measurements

st.title("Results")
run = wb.current_run()
methods = st.multiselect("Methods", run.methods, default=run.methods)
shown = methods or run.methods

st.subheader("Multiple choice (test split)")
mc = measurements.mc_frame(run.results)
mc = mc[mc["method"].isin(shown)].reset_index(drop=True)
fig = figures.mc_bars(mc)
st.plotly_chart(fig, key="mc_scores")
st.dataframe(mc, hide_index=True)
wb.table_download(mc, "mc_scores")
wb.remember("figures", "mc_scores", fig)
wb.remember("tables", "mc_scores", mc)

differences = measurements.against_base(run.predictions) if run.predictions is not None else pd.DataFrame()
if not differences.empty:
    differences = differences[differences["method"].isin(shown)].reset_index(drop=True)
    close = differences[differences["mc1_within_se"]]["method"].tolist()
    st.caption(
        "Against base, paired over the test questions (the same questions under both): each difference with "
        "its standard error. "
        + (
            f"Within one s.e. of base in MC1, too close to call on {int(differences['n'].iloc[0])} questions: "
            + ", ".join(close)
            + "."
            if close
            else "Every MC1 difference is larger than one s.e."
        )
    )
    st.dataframe(
        differences.style.format({c: "{:+.3f}" for c in ("mc1_diff", "mc2_diff")}).format(
            {c: "{:.3f}" for c in ("mc1_diff_stderr", "mc2_diff_stderr")}
        ),
        hide_index=True,
    )
    wb.table_download(differences, "against_base")
    wb.remember("tables", "against_base", differences)

bbq = measurements.bbq_frame(run.results)
if not bbq.empty:
    st.subheader("BBQ: accuracy and bias scores (test split)")
    st.caption(
        "Per method and category: accuracy (acc; acc_norm per answer byte, as lm-eval's) on ambiguous and on "
        "disambiguated contexts, and the BBQ paper's bias scores: 0 is no measured bias, 1 always the stereotype, "
        "-1 always against it."
    )
    bbq = bbq[bbq["method"].isin(shown)].reset_index(drop=True)
    st.dataframe(bbq, hide_index=True)
    wb.table_download(bbq, "bbq_scores")
    wb.remember("tables", "bbq_scores", bbq)

st.subheader("Flips against the base model")
flips = measurements.flip_frame(run.results)
if flips.empty:
    st.info("This run has no base model, so no flip rates.")
else:
    flips = flips[flips["method"].isin(shown)].reset_index(drop=True)
    st.dataframe(flips, hide_index=True)
    wb.table_download(flips, "flip_rates")
    wb.remember("tables", "flip_rates", flips)

st.subheader("What each edit costs")
costs = run.results.get("capability", {})
if not costs:
    st.info("This run folder predates the capability step: rerun `hpr reproduce` into it to measure it.")
else:
    neutral = run.results.get("neutral_text", {})
    st.caption(
        f"KL(base ‖ edited) of the next-token distribution and the perplexity change, on {neutral.get('passages')} "
        f"neutral passages ({neutral.get('path')}, {neutral.get('predictions')} predictions), every token edited."
    )
    cost = pd.DataFrame([{"method": m, **costs[m]} for m in shown if m in costs])
    gen = run.results.get("generation", {})
    if gen:
        gen_cols = [
            "bleu_acc",
            "rougeL_acc",
            "rougeL_acc_informative",
            "non_answer_rate",
            "degenerate_rate",
            "mean_answer_words",
        ]
        cost = cost.merge(
            pd.DataFrame([{"method": m, **{k: gen[m].get(k) for k in gen_cols}} for m in shown if m in gen]),
            on="method",
            how="left",
        )
    cost = cost.drop(columns=[c for c in ("nll", "tokens") if c in cost.columns])
    fig = figures.capability_bars(cost)
    st.plotly_chart(fig, key="capability")
    st.dataframe(cost, hide_index=True)
    wb.table_download(cost, "edit_costs")
    wb.remember("figures", "capability", fig)
    wb.remember("tables", "edit_costs", cost)

st.subheader("Strength curves (validation split)")
st.caption(
    "MC1, MC2 and KL as each method's strength goes from 0 (the unedited model) to past its fitted value: ITI "
    "alpha, CAA multiplier, Diff scale, SADI delta, HPR's angle scale (ours). Up and left on the trade-off is "
    "better (analyses/strength_curves.py)."
)
saved_curves = run.folder / "tables" / "strength_curves.csv"
curves = pd.read_csv(saved_curves) if saved_curves.exists() else None
if curves is None and (
    st.button("Compute the curves", icon=":material/play_arrow:") or st.session_state.get(f"curves:{run.folder}")
):
    st.session_state[f"curves:{run.folder}"] = True
    with wb.shows_errors("Cannot compute the curves"), st.spinner("Scoring every strength on val..."):
        curves = wb.run_script("strength_curves", str(run.folder), wb.stamp(run), wb.device(), None)["tables"][
            "strength_curves"
        ]
if curves is not None:
    curves = curves[curves["method"].isin(shown)]
    at_zero = curves[curves["strength"] == 0]["mc1"]  # strength 0 is the unedited model, for every method
    trade = figures.tradeoff(curves, float(at_zero.iloc[0]) if len(at_zero) else float("nan"))
    st.plotly_chart(trade, key="tradeoff")
    wb.remember("figures", "tradeoff", trade)
    for method in curves["method"].unique():
        curve = figures.strength_curves(curves, method)
        st.plotly_chart(curve, key=f"strength_{method}")
        wb.remember("figures", f"strength_{method}", curve)
    st.dataframe(curves, hide_index=True)
    wb.table_download(curves, "strength_curves")
    wb.remember("tables", "strength_curves", curves)

st.subheader("HPR: top-k edited layers")
if "base" not in run.methods or not (run.folder / "editors" / "hpr_all_layers" / "config.json").exists():
    st.info("The top-k sweep needs the base model and HPR fitted on every layer (editors/hpr_all_layers).")
    st.stop()
st.caption(
    "MC1/MC2 as HPR edits the top-k layers by validation probe accuracy, k = 1 .. layers, on val and "
    "test (val open and fainter; analyses/topk_sweep.py; scores every question once per k and split). The base "
    "lines are the unedited model's test scores."
)
if st.button("Compute the sweep", icon=":material/play_arrow:") or st.session_state.get(f"sweep:{run.folder}"):
    st.session_state[f"sweep:{run.folder}"] = True
    with wb.shows_errors("Cannot compute the sweep"), st.spinner("Scoring HPR at every k..."):
        out = wb.run_script("topk_sweep", str(run.folder), wb.stamp(run), wb.device(), None)
        st.plotly_chart(out["figures"]["topk_sweep"], key="topk_sweep")
        st.dataframe(out["tables"]["topk_sweep"], hide_index=True)
        wb.table_download(out["tables"]["topk_sweep"], "topk_sweep")
        wb.remember("figures", "topk_sweep", out["figures"]["topk_sweep"])
        wb.remember("tables", "topk_sweep", out["tables"]["topk_sweep"])

"""Results: MC1/MC2 table and bars (Table 1), flips against base (Table 3), the HPR top-k sweep (Fig. 6)."""

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

st.subheader("Flips against the base model")
flips = measurements.flip_frame(run.results)
if flips.empty:
    st.info("This run has no base model, so no flip rates.")
else:
    flips = flips[flips["method"].isin(shown)].reset_index(drop=True)
    st.dataframe(flips, hide_index=True)
    wb.table_download(flips, "flip_rates")
    wb.remember("tables", "flip_rates", flips)

st.subheader("HPR: top-k edited layers")
if "base" not in run.methods or not (run.folder / "editors" / "hpr_all_layers" / "config.json").exists():
    st.info("The top-k sweep needs the base model and HPR fitted on every layer (editors/hpr_all_layers).")
    st.stop()
st.caption(
    "MC1/MC2 as HPR edits the top-k layers by validation probe accuracy, k = 1 .. layers, on val and "
    "test (analyses/topk_sweep.py; scores every question once per k and split)."
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

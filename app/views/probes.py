"""Probes: per-layer probe accuracy on val and test, HPR's selected layers starred (paper Fig. 2)."""

import streamlit as st
import workbench as wb

from hpr import figures, measurements

st.title("Probes")
run = wb.current_run()
df = measurements.probe_frame(run.results)
splits = st.multiselect("Splits", list(df["split"].unique()), default=list(df["split"].unique()))
show_selected = st.checkbox("Star HPR's selected layers", value=True)

fig = figures.probe_accuracy(
    df[df["split"].isin(splits)] if splits else df, run.results["selected_layers"] if show_selected else ()
)
st.plotly_chart(fig, key="probe_accuracy")
table = df.pivot(index="layer", columns="split", values="accuracy").reset_index()
st.caption(f"Selected layers (top-k by validation accuracy): {run.results['selected_layers']}")
st.dataframe(table, hide_index=True)
wb.table_download(table, "probe_accuracy")
wb.remember("figures", "probe_accuracy", fig)
wb.remember("tables", "probe_accuracy", table)

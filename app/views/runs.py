"""Runs: open a finished run folder (instant: results.json only) or start a new run with hpr.runs.reproduce."""

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pandas as pd
import streamlit as st
import workbench as wb

from hpr import runs
from hpr.editors import default_labels, methods
from hpr.model_sources import NAMED_MODELS
from hpr.sources import load_dataset

MAX_UPLOAD_MB = 20

st.title("Runs")
ss = st.session_state


def keep(name):  # widget state is dropped on pages that don't draw the widget; keep a copy that stays
    ss[name] = ss[f"w_{name}"]


devices = list(dict.fromkeys(["auto", "cpu", "cuda", ss.device]))
ss.w_device = ss.device
root = wb.workspace()
with st.sidebar:
    st.caption(f"Workspace: `{root}` (HPR_APP_RUNS_ROOT); runs are listed, opened and created under it only")
    st.selectbox(
        "Device",
        devices,
        key="w_device",
        on_change=keep,
        args=("device",),
        help="for new runs and the shared model (auto: cuda if available)",
    )

# ---------------------------------------------------------------------------------------------- open a run
st.subheader("Open a run")
found = sorted({p.parent for pattern in ("*/results.json", "*/*/results.json") for p in root.glob(pattern)})
rows = []
for folder in found:
    if not (folder / "results.json").resolve().is_relative_to(root):
        continue  # a linked run folder or results.json that leads outside: never listed, never read
    with wb.shows_errors(f"{folder}/results.json is damaged, not listed"):
        res = json.loads((folder / "results.json").read_text())
        rows.append(wb.run_row(folder, res))
if rows:
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    listed = left.selectbox("Run under the root", [r["folder"] for r in rows])
    if right.button("Open", key="open-listed"):
        with wb.shows_errors("Cannot open the run"):
            wb.open_run(listed)
else:
    st.caption(f"No finished runs under `{root}`." if root.is_dir() else f"`{root}` is not a folder (yet).")
left, right = st.columns([4, 1], vertical_alignment="bottom")
typed = left.text_input("Or a run folder in the workspace", placeholder="run-name or a path under the workspace")
if right.button("Open", key="open-path"):
    with wb.shows_errors("Cannot open the run"):
        wb.open_run(typed.strip() or ".")
if ss.run_folder:
    st.success(f"Open: `{ss.run_folder}`")
    with wb.shows_errors():
        opened = wb.current_run()
        st.code(runs.format_results(opened.results), language=None)
        with st.expander("Reproducibility: settings, inputs, code, timings", icon=":material/fingerprint:"):
            st.caption(
                "What made this run: `hpr reproduce` with these settings on these inputs (the data's and the "
                "model's fingerprints: a rerun into this folder refuses other ones) and this code."
            )
            st.json(wb.provenance(opened), expanded=1)
            timings = opened.results.get("timings_s", {})
            if timings:
                st.dataframe(pd.Series(timings, name="seconds of work"), use_container_width=False)

# --------------------------------------------------------------------------------------------- start a run
st.subheader("Start a run")
c1, c2 = st.columns(2)
kind = c1.radio(
    "Model",
    ["toy", *NAMED_MODELS, "local checkpoint dir", "GGUF file", "hub name"],
    horizontal=True,
    help="; ".join(f"{name}: {source.description}" for name, source in NAMED_MODELS.items()),
)
model = (
    kind
    if kind == "toy" or kind in NAMED_MODELS
    else c1.text_input(
        {"local checkpoint dir": "Checkpoint folder", "GGUF file": "Path to a .gguf file", "hub name": "Hub id"}[kind]
    )
)
dtype = c1.selectbox(
    "Model dtype",
    ["float32", "bfloat16", "float16"],
    help=runs.RunConfig.__dataclass_fields__["dtype"].metadata["help"],
)
dataset = c2.radio("Dataset", ["toy", "truthfulqa (path)", "bbq (path)", "jsonl upload"], horizontal=True)
data_path, upload = None, None
if dataset.startswith("truthfulqa"):
    data_path = c2.text_input("mc_task.json, TruthfulQA.csv or their folder (in the workspace or HPR_APP_READ_ROOTS)")
elif dataset.startswith("bbq"):
    data_path = c2.text_input("A BBQ category .jsonl or a folder of them (in the workspace or HPR_APP_READ_ROOTS)")
elif dataset == "jsonl upload":
    upload = c2.file_uploader(f"JSON lines (≤ {MAX_UPLOAD_MB} MB; format: hpr.data.jsonl)", type=["jsonl", "json"])
registered = methods()
labels = st.multiselect(
    "Methods",
    default_labels(),
    default=list(default_labels()),
    help="; ".join(f"{m.name}: {m.summary}" for m in registered.values()),
)
c1, c2, c3, c4 = st.columns(4)
defaults = runs.RunConfig().settings
top_k = c1.number_input("HPR top-k layers", 1, 256, defaults["hpr"].top_k)
iti_k = c2.number_input("ITI K heads", 1, 4096, defaults["iti"].k)
limit = c3.number_input("Question limit (0: all)", 0, 1_000_000, 0)
seed = c4.number_input("Seed", 0, 2**31 - 1, 0)
# A fixed key and a default set once: a default in the widget's signature (a timestamp) would make every
# rerun a new widget a second later, dropping what the user typed. Renewed after each finished run.
if "w_out" not in ss or ss.pop("renew_out", False):
    ss.w_out = str(root / time.strftime("run-%Y%m%d-%H%M%S"))
out = st.text_input("Run folder", key="w_out")
replace_ok = st.checkbox(
    "Allow dropping methods from a finished run",
    help="a run folder that holds a finished run with methods not picked here gets results without them",
)

if st.button("Start", type="primary", icon=":material/play_arrow:"):
    with wb.shows_errors("The run failed"):
        if not model.strip():
            raise ValueError("name a model: a checkpoint folder or a hub id")
        if not labels:
            raise ValueError("pick at least one method")
        if kind in ("GGUF file", "local checkpoint dir"):  # checked before anything opens it
            model = str(wb.readable(model.strip(), "the model"))
        if kind == "GGUF file" and not Path(model).is_file():
            raise FileNotFoundError(f"{model} is not a file")
        if kind.startswith("local") and not (Path(model) / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a Hugging Face checkpoint folder (no config.json in it)")
        out_dir = wb.inside_workspace(out)
        if out_dir == root:
            raise ValueError(f"the run folder is the workspace {root} itself: name a folder under it")
        dropped = wb.methods_dropped(out_dir, labels)
        if dropped and not replace_ok:
            raise ValueError(
                f"{out_dir} holds a finished run with {', '.join(dropped)}, which are not picked here: its "
                "results would be replaced without them. Pick them too, choose another run folder, or tick "
                "'Allow dropping methods from a finished run'"
            )
        name = dataset.split(" ")[0]  # toy, truthfulqa, bbq, jsonl
        if upload is not None:  # parsed as data by the library's loader (errors name line and field), then
            if upload.size > MAX_UPLOAD_MB * 2**20:  # kept under the workspace, named by its content
                raise ValueError(f"{upload.name} is {upload.size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_MB} MB")
            with tempfile.TemporaryDirectory() as tmp:
                checked = Path(tmp) / Path(upload.name).name
                checked.write_bytes(upload.getvalue())
                load_dataset("jsonl", checked)
            # A new file per content, never over one a run uses: a changed upload cannot rewrite an old run's data.
            data_path = str(root / "uploads" / f"{hashlib.sha256(upload.getvalue()).hexdigest()[:16]}.jsonl")
            if not Path(data_path).exists():
                Path(data_path).parent.mkdir(parents=True, exist_ok=True)
                Path(data_path + ".tmp").write_bytes(upload.getvalue())
                os.replace(data_path + ".tmp", data_path)
        elif name == "jsonl":
            raise ValueError("upload a JSON-lines file first")
        elif data_path:
            data_path = str(wb.readable(data_path.strip(), "the data file"))
        n = len(load_dataset(name, data_path or None))  # a wrong path or format fails here, before any work
        settings = {
            "hpr": dataclasses.replace(defaults["hpr"], top_k=int(top_k)),
            "iti": dataclasses.replace(defaults["iti"], k=int(iti_k)),
        }
        cfg = runs.RunConfig(
            model=model.strip(),
            dtype=dtype,
            dataset=name,
            data_path=data_path or None,
            methods=tuple(labels),
            limit=int(limit) or None,
            seed=int(seed),
            settings=settings,
        )
        with st.status(f"Running {len(labels)} methods on {n} questions into `{out_dir}`...", expanded=True) as status:
            handler = logging.Handler(logging.INFO)
            handler.emit = lambda record: st.write(record.getMessage())
            logging.getLogger("hpr").addHandler(handler)
            logging.getLogger("hpr").setLevel(logging.INFO)
            t0 = time.perf_counter()
            try:
                results = runs.reproduce(cfg, out_dir, device=wb.device(), progress=False)
            except Exception:
                status.update(label="The run failed", state="error")
                raise
            finally:
                logging.getLogger("hpr").removeHandler(handler)
            st.dataframe(pd.Series(results["timings_s"], name="seconds"))
            status.update(label=f"Finished in {time.perf_counter() - t0:.0f} s", state="complete")
        wb.open_run(out_dir)
        ss.renew_out = True  # the next run gets a new folder by default
        st.code(runs.format_results(results), language=None)

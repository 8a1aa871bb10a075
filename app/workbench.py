"""What every page of the Streamlit app shares: the open run, the one cached model, the lock, error display.

The app is thin over :mod:`hpr`: pages call the library (or an ``analyses/`` script's ``make``) and show what
comes back. One model is cached per process (``st.cache_resource``) and shared by every session, so every call
that runs it, edited or not, holds :data:`MODEL_LOCK` (representation tuning swaps weights inside
``editor.applied``, so even an unedited call must not overlap an edited one).

Environment: ``HPR_APP_RUNS_ROOT`` (the workspace: the only folder the app lists, opens, creates runs and
keeps uploads under; default ``runs``), ``HPR_APP_READ_ROOTS`` (more folders, separated by ``:``, that data
files and model checkpoints may be read from; default none), ``HPR_APP_RUN`` (a run folder in the workspace,
opened in every new session), ``HPR_APP_DEVICE`` (cpu, cuda; default: cuda if available).

Confinement: every path is resolved (symlinks followed) before it is checked, a run folder holding a link
that leads outside the workspace is refused, and the app serves nothing when Streamlit was started without
an address to listen on (:func:`check_binding`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import tempfile
import threading
import types
from pathlib import Path

import pandas as pd
import streamlit as st

from hpr import figures, measurements

ROOT = Path(__file__).resolve().parent.parent
ANALYSES = ROOT / "analyses"
MODEL_LOCK = threading.Lock()  # module-level: one per process, shared by every session


# ------------------------------------------------------------------------------------------- session state


def init_state() -> None:
    """Defaults of the per-session state; a run named by $HPR_APP_RUN is opened once per session."""
    ss = st.session_state
    ss.setdefault("device", os.environ.get("HPR_APP_DEVICE") or "auto")
    ss.setdefault("outputs", {"figures": {}, "tables": {}})
    if "run_folder" not in ss:
        ss.run_folder = None
        if os.environ.get("HPR_APP_RUN"):
            with shows_errors():
                open_run(os.environ["HPR_APP_RUN"])


def device() -> str:
    from hpr.models import default_device

    chosen = st.session_state.get("device", "auto")
    return str(default_device()) if chosen == "auto" else chosen


def workspace() -> Path:
    """The one folder the app reads and writes under (``$HPR_APP_RUNS_ROOT``, default ``runs``), resolved."""
    return Path(os.environ.get("HPR_APP_RUNS_ROOT", "runs")).expanduser().resolve()


def inside_workspace(path: str | os.PathLike) -> Path:
    """``path`` (relative ones are taken from the workspace) resolved, or a ``ValueError`` if it leads outside."""
    root = workspace()
    resolved = (root / Path(path).expanduser()).resolve()
    if not resolved.is_relative_to(root):
        raise ValueError(
            f"{path} is outside the workspace {root}: the app reads and writes only under it "
            "(set HPR_APP_RUNS_ROOT to work elsewhere)"
        )
    return resolved


def check_binding() -> None:
    """Serve nothing when Streamlit listens on every interface because nobody chose an address: its
    ``.streamlit/config.toml`` (127.0.0.1) is read only from the working directory, so ``streamlit run
    <checkout>/app/main.py`` from elsewhere would share every run with the network. An address chosen on
    purpose (``--server.address 0.0.0.0``, or a config file) is served."""
    if st.get_option("server.address") is None:
        st.error(
            "Streamlit was started without an address to listen on, so it listens on every network interface; "
            f"the workbench serves nothing like that. Restart it with `streamlit run {ROOT / 'app' / 'main.py'} "
            "--server.address 127.0.0.1` (or from the checkout, whose .streamlit/config.toml sets it), or "
            "choose an address on purpose, e.g. `--server.address 0.0.0.0`.",
            icon=":material/lock:",
        )
        st.stop()


def read_roots() -> list[Path]:
    """The folders the app may read data files and checkpoints from: the workspace and $HPR_APP_READ_ROOTS."""
    extra = os.environ.get("HPR_APP_READ_ROOTS", "")
    return [workspace()] + [Path(p).expanduser().resolve() for p in extra.split(os.pathsep) if p.strip()]


def readable(path: str | os.PathLike, what: str) -> Path:
    """``path`` resolved (relative ones from the working directory, as the library's loaders read them), or
    a ``ValueError`` if it leads outside :func:`read_roots`: the app never opens a file elsewhere, so it never
    shows such a file's bytes."""
    resolved = Path(path).expanduser().resolve()
    roots = read_roots()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ValueError(
            f"{what} {path} is outside the folders the app reads ({', '.join(map(str, roots))}); put it under "
            "the workspace, or add its folder to HPR_APP_READ_ROOTS (folders separated by ':') and restart"
        )
    return resolved


def check_links(folder: Path) -> None:
    """Refuse a run folder that holds a symbolic link leading outside the workspace (a results.json,
    config.json or shard pointing at any file on the machine)."""
    root = workspace()
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ValueError(
                    f"{path} is a link to {path.resolve()}, outside the workspace {root}: the app reads only "
                    "under it; copy the file into the run folder instead"
                )


def check_run_sources(run: measurements.Run) -> None:
    """The run's data file and model checkpoint, where they are paths, must be in :func:`read_roots`."""
    data_path = run.config.get("data_path")
    if data_path:
        readable(data_path, "its data file")
    model = str(run.config.get("model", ""))
    if model and Path(model).expanduser().exists():  # a checkpoint folder or GGUF file, not a name
        readable(model, "its model")


def methods_dropped(folder: Path, labels) -> list[str]:
    """The methods of the finished run in ``folder`` (if any) that ``labels`` leaves out: a run there would
    replace its results without them."""
    path = folder / "results.json"
    if not path.is_file():
        return []
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("methods", {})
    except (OSError, ValueError, AttributeError):
        return []  # not a readable results file: the run itself refuses or rebuilds it
    return [m for m in recorded if m not in set(labels)]


def open_run(folder: str | os.PathLike) -> measurements.Run:
    """Open a finished run folder (reads its results.json and config.json only) and make it this session's."""
    run = read_run(str(inside_workspace(folder)))
    st.session_state.run_folder = str(run.folder)
    st.session_state.outputs = {"figures": {}, "tables": {}}
    return run


def read_run(folder: str) -> measurements.Run:
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    inside_workspace(path)  # resolved again: a folder that became a link since it was opened
    check_links(path)
    try:
        run = measurements.Run(path)
        check_run_sources(run)
        return run
    except json.JSONDecodeError as e:
        raise ValueError(f"{folder} holds a damaged results.json or config.json ({e})") from e
    except (KeyError, FileNotFoundError) as e:
        if isinstance(e, FileNotFoundError) and "results.json" in str(e):
            raise
        raise ValueError(f"{folder} is not a complete run folder (missing {e})") from e


def current_run() -> measurements.Run:
    """The open run, or a pointer to the Runs page and the end of this page."""
    folder = st.session_state.get("run_folder")
    if not folder:
        st.info("No run is open: open or start one on the **Runs** page.")
        st.page_link("views/runs.py", label="Go to Runs", icon=":material/folder_open:")
        st.stop()
    try:
        return read_run(folder)
    except (OSError, ValueError) as e:
        st.error(f"The open run can no longer be read: {e}")
        st.stop()


def stamp(run: measurements.Run) -> float:
    """Changes when the run folder is rewritten: part of every cache key, with the folder."""
    return (run.folder / "results.json").stat().st_mtime


def remember(kind: str, name: str, obj) -> None:
    """Offer a figure or table made on a page for export on the Export page."""
    st.session_state.outputs[kind][name] = obj


# ----------------------------------------------------------------------------------------------- the model


@st.cache_resource(max_entries=1, show_spinner="Loading the model (shared by every session)...")
def shared_model(name: str, device: str, dtype: str = "float32"):
    import hpr

    return hpr.load_model(name, device=device, dtype=dtype)


def with_model(run: measurements.Run) -> measurements.Run:
    """``run`` with the shared model in place of its own (``Run.model`` is a cached property)."""
    run.device = device()
    run.__dict__["model"] = shared_model(run.config["model"], run.device, run.config.get("dtype") or "float32")
    return run


def analysis_script(name: str):
    """An ``analyses/<name>.py`` script as a module (loaded by path: analyses/ is no package)."""
    spec = importlib.util.spec_from_file_location(f"hpr_analyses_{name}", ANALYSES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_args(**kw) -> types.SimpleNamespace:
    """The options an analyses/ script's ``make(run, args)`` reads: script_parser's own defaults, so a new
    option reaches the app's runs of the scripts without being listed twice."""
    from hpr.measurements import script_parser

    defaults = vars(script_parser("").parse_args(["--run", ""]))
    return types.SimpleNamespace(**{**defaults, **kw})


@st.cache_data(show_spinner=False, max_entries=32)
def run_script(name: str, folder: str, stamp: float, device: str, methods: tuple[str, ...] | None) -> dict:
    """``analyses/<name>.py``'s ``make`` on the run, with the shared model, under the lock; cached per
    (script, folder, results.json time, device, methods)."""
    run = with_model(read_run(folder))
    with MODEL_LOCK:
        return analysis_script(name).make(run, script_args(methods=list(methods) if methods else None))


# ------------------------------------------------------------------------------------------ errors, output


@contextlib.contextmanager
def shows_errors(what: str = ""):
    """Turn any error into ``st.error`` with its message (never a traceback); Streamlit's own control flow
    (st.stop, reruns) derives from BaseException and passes through."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - the page shows every failure as a message
        message = str(e) or type(e).__name__
        st.error(f"{what}{': ' if what else ''}{message}", icon=":material/error:")


def table_download(df: pd.DataFrame, name: str) -> None:
    """The table as CSV, one click (markdown and LaTeX on the Export page)."""
    st.download_button(
        f"Download {name}.csv",
        df.to_csv(index=False).encode(),
        f"{name}.csv",
        "text/csv",
        key=f"csv-{name}",
        icon=":material/download:",
    )


def figure_bytes(name: str, fig, fmt: str, scale: float = figures.PNG_SCALE) -> bytes:
    """One figure as PNG (at ``scale``)/SVG/PDF (kaleido, needs a Chromium) or self-contained HTML."""
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "html":
            paths = figures.export_figures({name: fig}, Path(tmp), formats=(), html=True)
        else:
            paths = figures.export_figures({name: fig}, Path(tmp), formats=(fmt,), html=False, scale=scale)
        return paths[0].read_bytes()


def table_bytes(name: str, df: pd.DataFrame, fmt: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        paths = figures.export_table(df, Path(tmp), name)
        return next(p for p in paths if p.suffix == f".{fmt}").read_bytes()


MIME = {
    "png": "image/png",
    "svg": "image/svg+xml",
    "pdf": "application/pdf",
    "html": "text/html",
    "csv": "text/csv",
    "md": "text/markdown",
    "tex": "application/x-tex",
}


def run_row(folder: Path, results: dict) -> dict:
    """A run's line in the Runs page's list: where, when, what, and its headline MC1s."""
    import datetime

    finished = datetime.datetime.fromtimestamp((folder / "results.json").stat().st_mtime)
    methods = results.get("methods", {})
    code = results.get("code") or {}

    def mc1(label: str):
        return methods.get(label, {}).get("mc1")

    return {
        "folder": str(folder),
        "finished": finished.strftime("%Y-%m-%d %H:%M"),
        "model": results.get("model"),
        "dataset": results.get("dataset"),
        "test questions": results.get("splits", {}).get("test"),
        "base MC1": mc1("base"),
        "HPR MC1": mc1("hpr"),
        "methods": ", ".join(methods),
        "commit": (code.get("commit") or "")[:10] + ("+" if code.get("dirty") else ""),
    }


def provenance(run) -> dict:
    """Everything that says how ``run`` was made, for its reproducibility panel."""
    results = run.results
    return {
        "command": "hpr reproduce " + " ".join(_flags(run.config)),
        "seed": run.config.get("seed"),
        "settings": run.config,
        "inputs": run.inputs,
        "code": results.get("code", "not recorded (a run from before hpr recorded its code)"),
        "workers": results.get("workers", 1),
        "wall_s": results.get("wall_s"),
        "splits": results.get("splits"),
    }


def _flags(config: dict) -> list[str]:
    """The run-level flags of ``config`` as ``hpr reproduce`` takes them (methods' settings are in "settings")."""
    flags = []
    for key in ("model", "dtype", "dataset", "data_path", "limit", "seed", "batch_size"):
        value = config.get(key)
        if value is not None:
            flags.append(f"--{key.replace('_', '-')} {value}")
    if config.get("methods"):
        flags.append("--methods " + ",".join(config["methods"]))
    return flags

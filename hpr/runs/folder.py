"""A run folder, read and written: the layout ``hpr reproduce`` writes, and :class:`Run`, which opens a finished
one for the analyses and the app.

Layout::

    config.json           everything needed to rerun: the settings (each method's under its name;
                          config_format 2), the data's and the model's fingerprints
    splits.json           question ids of train / val / test
    activations/<split>/  answer-token resid_post shards (hpr.activations)
    probes.json           per-layer probe accuracy (val, test), the selected layers, the epoch kept
    editors/<label>/      config.json + state.safetensors (hpr_all_layers: HPR fitted on every layer)
    iti_heads.json        ITI: per-head val probe accuracy and the selected heads
    <method>_sweep.json   CAA, SADI: val MC1/MC2 per candidate setting, and the one chosen
    caa_layer_sweep.json  CAA: val MC1/MC2 at each of HPR's layers (multiplier 1), and the layer chosen
    predictions/<label>.parquet, predictions/<label>.norms.safetensors, predictions.parquet
    results.json

Every write is atomic (a temporary file renamed into place). A damaged cache (an editor, predictions, norms)
is reported and rebuilt on the next run; a damaged record of settings or results is an error naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from hpr.data.prompts import PromptFormat
from hpr.data.schema import MCQuestion
from hpr.editors import BASE, load_editor
from hpr.files import atomic_write
from hpr.models import FINGERPRINT_PREFIX
from hpr.sources import load_dataset, load_model, prompt_format

log = logging.getLogger(__name__)

_RESULT_KEYS = {
    "model": str,
    "dataset": str,
    "splits": dict,
    "n_layers": int,
    "probe_accuracy": dict,
    "selected_layers": list,
    "methods": dict,
    "flip_rates": dict,
    "norm_change": dict,
    "norm_change_vs_base": dict,
}


def check_results(results, path: Path) -> dict:
    """``results`` if it has the shape ``hpr reproduce`` writes, else a ``ValueError`` naming what is wrong."""

    def bad(problem):
        return ValueError(
            f"{path} is not a results file of hpr reproduce ({problem}); rerun hpr reproduce into "
            "its folder to rebuild it"
        )

    if not isinstance(results, dict):
        raise bad(f"a JSON {type(results).__name__}, not an object")
    for key, kind in _RESULT_KEYS.items():
        if not isinstance(results.get(key), kind):
            raise bad(f"{key!r} is missing or not a {kind.__name__}")
    for method, row in results["methods"].items():
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), (int, float)) for k in ("mc1", "mc2", "mc1_stderr", "mc2_stderr")
        ):
            raise bad(f"methods[{method!r}] lacks numbers mc1, mc2, mc1_stderr, mc2_stderr")
    if not all(isinstance(results["probe_accuracy"].get(s), list) for s in ("val", "test")):
        raise bad("probe_accuracy lacks its val and test lists")
    if not isinstance(results["splits"].get("test"), int):
        raise bad("splits lacks the test count")
    return results


def read_probes(path: Path, n_layers: int) -> dict:
    """``probes.json`` (HPR's per-layer probe accuracy and the layers every method edits), checked: an
    object with per-split lists of ``n_layers`` accuracies and distinct layer numbers below ``n_layers``;
    else a ``ValueError`` naming the file and what is wrong."""
    probes = read_json(path, "probe accuracy")

    def bad(problem):
        return ValueError(
            f"{path} is damaged ({problem}); delete it and {path.parent / 'editors' / 'hpr'} to fit HPR again"
        )

    if not isinstance(probes, dict):
        raise bad(f"a JSON {type(probes).__name__}, not an object")
    accuracy = probes.get("accuracy")
    if not isinstance(accuracy, dict):
        raise bad("'accuracy' is missing or not an object")
    for split in ("val", "test"):
        values = accuracy.get(split)
        if not (isinstance(values, list) and len(values) == n_layers and all(_is_fraction(v) for v in values)):
            raise bad(f"accuracy[{split!r}] is not a list of {n_layers} accuracies, one per layer")
    layers = probes.get("selected_layers")
    if not (
        isinstance(layers, list)
        and layers
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_layers for v in layers)
        and len(set(layers)) == len(layers)
    ):
        raise bad(f"'selected_layers' is {layers!r}, not distinct layer numbers from 0 to {n_layers - 1}")
    return probes


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@dataclass
class Run:
    """A finished run folder (``hpr reproduce``), opened for analysis."""

    folder: Path
    device: str | None = None

    def __post_init__(self):
        self.folder = Path(self.folder)
        path = self.folder / "results.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{self.folder} is not a finished run folder (no results.json); run "
                f"`hpr reproduce --out {self.folder} ...` first"
            )
        self.results = check_results(read_json(path, "results"), path)
        record = read_json(self.folder / "config.json", "run config")
        if not isinstance(record, dict) or not isinstance(record.get("run"), dict):
            raise ValueError(f"{self.folder / 'config.json'} holds no run settings; rerun hpr reproduce")
        self.config = record["run"]
        self.inputs = record.get("inputs", {})

    @property
    def methods(self) -> list[str]:
        return list(self.results["methods"])

    @cached_property
    def model(self):
        return load_model(self.config["model"], device=self.device, dtype=self.config.get("dtype"))

    @cached_property
    def predictions(self) -> pd.DataFrame | None:
        """Every choice's log-likelihood under every method on the test split (``predictions.parquet``); None
        when the folder holds none readable."""
        return saved_predictions(self.folder / "predictions.parquet")

    @cached_property
    def fmt(self) -> PromptFormat:
        return prompt_format(self.config["dataset"])

    def questions(self, split: str = "test") -> list[MCQuestion]:
        questions = load_dataset(self.config["dataset"], self.config.get("data_path"))
        if self.config.get("limit") is not None:
            questions = questions[: self.config["limit"]]
        recorded = self.inputs.get("dataset_sha256")
        if recorded is not None and recorded != dataset_fingerprint(questions):
            raise ValueError(
                f"the data at {self.config.get('data_path') or self.config['dataset']} changed since "
                f"{self.folder} was run (its fingerprint differs); restore it, or rerun into a new folder"
            )
        ids = set(json.loads((self.folder / "splits.json").read_text())[split])
        return [q for q in questions if q.id in ids]

    def editor(self, method: str):
        """The method's editor, or None for ``base``."""
        return None if method == BASE else load_editor(self.folder / "editors" / method, device=self.device)

    def editors(self, methods: Sequence[str] | None = None) -> dict:
        return {m: self.editor(m) for m in (methods or self.methods)}


def check_run_folder(out: Path) -> None:
    """Refuse, before anything is loaded or written, an ``--out`` that is a file, or a folder whose files are
    not a run's (a run folder's ``config.json`` is its first file, so a folder without one holds no run,
    interrupted or finished): a run there would overwrite or mix with them."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pick a new or empty folder for the run")
    if out.is_dir() and not (out / "config.json").exists():
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise ValueError(
                f"--out {out} already holds files that are not a run folder ({shown}); pick a new or empty "
                "folder, or a run folder to resume"
            )


def read_json(path: Path, what: str):
    """A JSON file of a run folder, or a ``ValueError`` naming it and what is wrong."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: the {what} file is damaged ({e}); restore it or start a new run folder") from e


def editor_is_intact(folder: Path) -> bool:
    """Whether a fitted editor is saved in ``folder`` and loads. A damaged one is a cache: it is reported,
    removed, and fitted again."""
    if not (folder / "config.json").exists():
        return False
    try:
        load_editor(folder)
        return True
    except (ValueError, OSError) as e:
        log.warning("%s is damaged (%s); fitting it again", folder, " ".join(str(e).split()))
        for name in ("config.json", "state.safetensors"):
            (folder / name).unlink(missing_ok=True)
        return False


def saved_predictions(path: Path) -> pd.DataFrame | None:
    """A method's saved predictions, or None when there are none or they are damaged (reported; scored again)."""
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's own error types
        log.warning("%s is damaged (%s); scoring again", path, e)
        return None


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def dataset_fingerprint(questions) -> str:
    """sha256 of the questions as the run uses them (ids, texts, choices, labels, and a JSONL passage shown
    before the question): the same for the same data in any file format, different when any label or text
    changes. A question's context is appended to its record only when it has one, so data without contexts
    (TruthfulQA, the toy world) keeps the fingerprint it had before contexts were counted."""
    records = []
    for q in questions:
        record = [q.id, q.question, [[c.text, c.is_true] for c in q.mc1], [[c.text, c.is_true] for c in q.mc2]]
        if q.context:
            record.append(q.context)
        records.append(record)
    return hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()


def _short(value) -> str:
    return str(value).removeprefix(FINGERPRINT_PREFIX)[:16]


def check_inputs(out: Path, recorded: dict | None, inputs: dict) -> None:
    """Refuse a run folder built from another dataset or model, naming which and both fingerprints."""
    for key, what in (
        ("dataset_sha256", "dataset"),
        ("model_fingerprint", "model's weights"),
        ("n_questions", "number of questions"),
    ):
        old = (recorded or {}).get(key)
        if old is not None and old != inputs[key]:
            raise ValueError(
                f"{out} was built from another {what} ({key} {_short(old)} there, {_short(inputs[key])} now); "
                "pick another --out, or restore the input it was built from to resume"
            )

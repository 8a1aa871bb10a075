"""The method registry: each editor module registers one :class:`Method`, and everything that lists methods
(the run pipeline, the CLI, the app, the figures' colours) reads it here.

A method is one file in ``hpr/editors/``: its editor class, its settings (a frozen dataclass whose fields carry
their help text; the run config holds one under the method's name, the CLI makes ``--<method>-<field>`` flags
of them), its fit step (fits on the train split, tunes on val only, saves every run label it provides) and its
run labels (``iti15``, ``iti200``). Every module of this package is imported by :func:`methods`, so adding a
file is all the package needs; the shared editor tests (``tests/test_methods.py``) need an entry for it, and
fail until it has one.

The fit step talks to the run through a :class:`FitContext`, which the run builds: the split questions, the
cached activations, the layers HPR selected, and a validation scorer. Editors never import the evaluation
or run code; the context brings it to them.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpr.files import write_json

BASE = "base"  # the unedited model: a run label of no method
BASE_COLOUR = "#000000"


@dataclass(frozen=True)
class Method:
    name: str  # the editor's ``method``, its fit step's and its settings' name
    summary: str  # one line for the CLI and the app
    labels: tuple[str, ...]  # the run labels it provides in a default run, in table order
    colours: Mapping[str, str]  # one colour per label, in every figure
    order: int  # place in tables and in the fitting order (HPR first: it selects every method's layers)
    fit: Callable[[FitContext], None] | None = None  # fits and saves each asked label not already saved
    settings: type | None = None  # its run settings (a frozen dataclass), if it has any of its own
    label_pattern: str | None = None  # further labels it provides (``iti<alpha>``)
    # Run folders written before the registry kept settings flat on the run config: old key -> field.
    flat_settings: Mapping[str, str] = field(default_factory=dict)
    # Settings whose absence from an old run folder means the behaviour of the versions before them.
    absent_means: Mapping[str, Any] = field(default_factory=dict)

    def provides(self, label: str) -> bool:
        return label in self.labels or bool(self.label_pattern and re.fullmatch(self.label_pattern, label))


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register ``method``; a module registering again (reloaded) replaces its own entry, another module's
    method of the same name is refused."""
    old = _METHODS.get(method.name)
    if (
        old is not None
        and old.fit is not None
        and method.fit is not None
        and old.fit.__module__ != method.fit.__module__
    ):
        raise ValueError(
            f"two methods are registered as {method.name!r}: in {old.fit.__module__} and {method.fit.__module__}"
        )
    _METHODS[method.name] = method
    return method


_IMPORTED: list[bool] = []  # whether every module of the package has been imported (once per process)


def methods() -> dict[str, Method]:
    """Every registered method, in :attr:`Method.order`; the first call imports each module of this package."""
    if not _IMPORTED:
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            importlib.import_module(f"{__package__}.{info.name}")
        _IMPORTED.append(True)
    return dict(sorted(_METHODS.items(), key=lambda item: item[1].order))


def default_labels() -> tuple[str, ...]:
    """``base`` and every registered method's labels: the methods of a default run, in table order."""
    return (BASE,) + tuple(label for method in methods().values() for label in method.labels)


def method_of(label: str) -> Method | None:
    """The method that provides run label ``label`` (None for ``base`` and unknown labels)."""
    return next((m for m in methods().values() if m.provides(label)), None)


def colour_of(label: str) -> str | None:
    if label == BASE:
        return BASE_COLOUR
    method = method_of(label)
    return None if method is None else method.colours.get(label)


def default_settings() -> dict[str, Any]:
    return {name: m.settings() for name, m in methods().items() if m.settings is not None}


@dataclass
class FitContext:
    """What a method's fit step reads and where it writes: built by the run for each fit."""

    settings: Mapping[str, Any]  # every method's settings, by method name
    labels: Sequence[str]  # the run labels asked for
    model: Any
    parts: Mapping[str, Sequence]  # train / val / test questions
    fmt: Any  # the scoring prompt format
    acts_dir: Path  # cached answer activations, one folder per split
    editors_dir: Path
    out: Path  # the run folder (sweep records)
    batch_size: int
    progress: bool
    score_on_val: Callable[[str, Any], dict]  # (label, editor) -> {"mc1", "mc2"} on the validation split
    train_token_pairs: Callable[
        [], tuple
    ]  # the aligned (pos, neg, question index) train pairs, read from disk per call
    is_saved: Callable[[Path], bool]  # whether an editor folder holds an intact editor (a damaged one is refitted)
    probes: dict | None = None  # HPR's probes.json, once HPR has fitted: its selected layers are everyone's
    val_scores: dict[tuple[str, str], dict] = field(default_factory=dict)  # (label, editor digest) -> val MC

    @property
    def layers(self) -> list[int]:
        if self.probes is None:
            raise RuntimeError("HPR's layer selection has not run yet")
        return list(self.probes["selected_layers"])

    def done(self, label: str) -> bool:
        return self.is_saved(self.editors_dir / label)

    def save(self, label: str, editor) -> None:
        editor.save(self.editors_dir / label, self.model)

    def write_json(self, name: str, obj) -> None:
        write_json(self.out / name, obj)

    def sweep(
        self, label: str, candidates: list[tuple[dict, Any]], extra: dict | None = None, record: str | None = None
    ):
        """The candidate with the best val MC1 (then MC2, then the first listed); the sweep is recorded in
        ``<record>.json`` (default ``<label>_sweep.json``)."""
        from tqdm.auto import tqdm

        rows = []
        for params, editor in tqdm(candidates, desc=f"{label} on val", disable=not self.progress, unit="setting"):
            key = (label, editor.digest())  # an editor already scored (CAA's chosen layer at x1) is not rescored
            if key not in self.val_scores:
                self.val_scores[key] = self.score_on_val(label, editor)
            rows.append({**params, **self.val_scores[key]})
        best = max(range(len(rows)), key=lambda i: (rows[i]["mc1"], rows[i]["mc2"], -i))
        self.write_json(f"{record or label + '_sweep'}.json", {**(extra or {}), "val": rows, "chosen": rows[best]})
        return candidates[best][1]

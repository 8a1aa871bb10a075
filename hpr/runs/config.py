"""The settings of a run: what ``config.json`` records, what a rerun must match to resume.

Settings shared by every method sit on :class:`RunConfig` itself; each method's own settings are the dataclass
its editor module registers (:mod:`hpr.editors.registry`), held under the method's name (``cfg.iti.k``,
``cfg.hpr.top_k``) and recorded under it in ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from hpr.editors import BASE, default_labels, method_of, methods
from hpr.editors.registry import default_settings
from hpr.sources import DATASETS

# config.json's "run": 2 nests each method's settings under its name; 1 (before the registry; no marker) kept
# them flat (``iti_k``). Both are read.
CONFIG_FORMAT = 2
FEW_TEST_QUESTIONS = 30  # below this, format_results warns that the scores say little


class MethodSettings(Mapping[str, Any]):
    """Each method's settings by method name: read-only and hashable, as the frozen run config holding it."""

    def __init__(self, items: Mapping[str, Any]):
        self._items = dict(items)

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"MethodSettings({self._items!r})"


@dataclass(frozen=True)
class RunConfig:
    model: str = field(
        default="toy", metadata={"help": '"toy", "smollm2", path/to/file.gguf, a local HF checkpoint dir, or a hub id'}
    )
    dtype: str = field(
        default="float32", metadata={"help": "model dtype: float32 (CPU default) | bfloat16 | float16 (GPU)"}
    )
    dataset: str = field(default="toy", metadata={"help": "toy | truthfulqa | bbq | jsonl"})
    data_path: str | None = field(default=None, metadata={"help": "file or folder for truthfulqa / bbq / jsonl"})
    methods: tuple[str, ...] = field(default_factory=default_labels, metadata={"help": "methods to evaluate"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N questions"})
    seed: int = field(default=0, metadata={"help": "split and training seed (every method that trains)"})
    fractions: tuple[float, float, float] = field(default=(0.4, 0.1, 0.5), metadata={"help": "train/val/test"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    fp16_activations: bool = field(default=False, metadata={"help": "store activations in float16"})
    neutral_text: str | None = field(
        default=None,
        metadata={
            "help": "capability step: a UTF-8 file of blank-line separated neutral passages (default: the shipped "
            "public-domain corpus; the toy model's own held-out documents)"
        },
    )
    neutral_passages: int = field(default=32, metadata={"help": "capability step: passages, evenly spaced"})
    neutral_tokens: int = field(default=64, metadata={"help": "capability step: tokens per passage, at most"})
    gen_max_new_tokens: int = field(
        default=64, metadata={"help": "generation step: greedy tokens per test answer, at most (lm-eval: 256)"}
    )
    # Each method's own settings, by method name; any left out take their defaults.
    settings: Mapping[str, Any] = field(default_factory=dict, metadata={"help": "each method's settings"})

    def __post_init__(self):
        object.__setattr__(self, "methods", tuple(self.methods))
        known = default_settings()
        clashes = sorted(set(known) & {f.name for f in dataclasses.fields(self)})
        if clashes:
            raise ValueError(f"methods named like a shared run setting: {clashes}; rename the method")
        unknown = sorted(set(self.settings) - set(known))
        if unknown:
            raise ValueError(f"settings for unknown methods {unknown}; methods with settings: {', '.join(known)}")
        settings = {}
        for name, default in known.items():
            given = self.settings.get(name, default)
            if not isinstance(given, type(default)):
                raise ValueError(f"{name} settings must be a {type(default).__name__}, got {type(given).__name__}")
            # The run's seed seeds every training: a method's own seed field follows it.
            if any(f.name == "seed" for f in dataclasses.fields(given)) and given.seed != self.seed:
                given = dataclasses.replace(given, seed=self.seed)
            settings[name] = given
        object.__setattr__(self, "settings", MethodSettings(settings))
        self._check()

    def __getattr__(self, name: str):
        """``cfg.iti``, ``cfg.hpr``: a method's settings."""
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"RunConfig has no setting {name!r}")

    def with_settings(self, **by_method) -> RunConfig:
        """The same run with some methods' settings replaced: ``cfg.with_settings(iti=ITISettings(k=8))``."""
        return dataclasses.replace(self, settings={**self.settings, **by_method})

    def _check(self) -> None:
        """Every shared option in range, once, here (each method's settings check themselves): the CLI and the
        app build this config; the steps trust it."""
        labels = self.methods
        if not labels:
            raise ValueError(f"methods is empty: name at least one of {', '.join(default_labels())}")
        unknown = [m for m in labels if m != BASE and method_of(m) is None]
        if unknown:
            raise ValueError(
                f"unknown methods {unknown}; available: {', '.join(default_labels())}, or iti<alpha> "
                "(e.g. iti50) for ITI at any alpha"
            )
        if len(set(labels)) != len(labels):
            raise ValueError(f"methods named twice: {[m for m in dict.fromkeys(labels) if labels.count(m) > 1]}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "jsonl" and not self.data_path:
            raise ValueError("dataset jsonl needs a data path (--data-path FILE.jsonl)")
        if self.dataset == "bbq" and not self.data_path:
            raise ValueError("dataset bbq needs a data path (--data-path CATEGORY.jsonl or a folder of them)")
        at_least_one = {
            "limit": self.limit,
            "batch_size": self.batch_size,
            "neutral_passages": self.neutral_passages,
            "neutral_tokens": self.neutral_tokens,
            "gen_max_new_tokens": self.gen_max_new_tokens,
        }
        for name, value in at_least_one.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        fractions = tuple(self.fractions)
        if len(fractions) != 3 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(
                f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}"
            )

    def to_json(self) -> dict:
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "settings"}
        shared.update({name: dataclasses.asdict(s) for name, s in self.settings.items()})
        return json.loads(json.dumps(shared))

    @classmethod
    def from_json(cls, d: dict) -> RunConfig:
        """The config recorded in ``d``. Run folders written before a setting existed read as what they did:
        its absence means the old behaviour (each method's ``absent_means``; e.g. editors edited every position),
        and folders from before the registry, which kept method settings flat (``iti_k``), are read too."""
        d = dict(d)
        registered = methods()
        settings = {}
        for name, method in registered.items():
            if method.settings is None:
                continue
            raw = dict(d.pop(name, None) or {})
            for old, new in method.flat_settings.items():
                if old in d:
                    raw[new] = d.pop(old)
            for key, old_value in method.absent_means.items():  # absent: recorded before the setting existed
                raw.setdefault(key, old_value)
            fields = {f.name for f in dataclasses.fields(method.settings)}
            unknown = sorted(set(raw) - fields)
            if unknown:
                raise ValueError(f"{name} settings have unknown fields {unknown}")
            settings[name] = method.settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        for k in ("methods", "fractions"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d, settings=settings)


def settings_differences(recorded: dict | None, cfg: RunConfig) -> list[str]:
    """``name: old -> new`` for each setting (nested ones dotted) where ``recorded`` and ``cfg`` differ, the
    methods evaluated aside (a rerun may add or drop methods)."""
    if not isinstance(recorded, dict):
        return [f"no run settings recorded ({recorded!r})"[:300]]
    try:
        old = dataclasses.replace(RunConfig.from_json(recorded), methods=cfg.methods).to_json()
    except (TypeError, ValueError):
        return [f"the recorded settings are not a valid run config of this version: {recorded!r}"[:300]]
    new = cfg.to_json()

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(old), flat(new)
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    seed = recorded.get("seed", 0)
    diffs += [
        f"{name}.seed: trained with {recorded[name]['seed']!r}, not the run's seed {seed!r}"
        for name in cfg.settings
        if isinstance(recorded.get(name), dict) and recorded[name].get("seed", seed) != seed
    ]
    return diffs


def same_settings(recorded: dict | None, cfg: RunConfig) -> bool:
    """Whether a run folder's recorded settings are ``cfg``'s, except for the methods evaluated.

    The method list may change between reruns: every step a method shares with others (activations, probes,
    fits) is keyed by the other settings, so a rerun with more methods extends the run (and one with fewer
    reports fewer). Compared after a round trip through :meth:`RunConfig.from_json`, so that a folder written
    before a setting existed (``dtype``) still resumes when the new setting has its default."""
    return not settings_differences(recorded, cfg)

"""``reproduce``: the whole pipeline into one run folder; every finished step is skipped on rerun.

Run folder::

    config.json           everything needed to rerun (model, dataset, seed, split fractions, HPR training)
    splits.json           question ids of train / val / test
    activations/<split>/  answer-token resid_post shards (hpr.activations)
    probes.json           per-layer probe accuracy (val, test) and the selected layers
    editors/<method>/     config.json + state.safetensors (hpr_all_layers: HPR fitted on every layer)
    iti_heads.json        ITI: per-head val probe accuracy and the selected heads
    <method>_sweep.json   CAA, SADI: val MC1/MC2 per candidate setting, and the one chosen
    predictions/<method>.parquet, predictions.parquet
    results.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

import hpr
from hpr import activations, evaluate, metrics
from hpr.data import apply_split, split_groups, split_ids
from hpr.editors import load_editor
from hpr.editors.additive import ITI_FEATURES, ITI_PRESETS, answer_head_activations, fit_caa, fit_iti
from hpr.editors.diff import train_diff
from hpr.editors.hpr import HPREditor, HPRTrainConfig, probe_accuracy, top_k_layers, train_layerwise
from hpr.editors.lora import LoRATrainConfig, fit_lora
from hpr.editors.reptune import RepTuneTrainConfig, fit_reptune
from hpr.editors.sadi import LEVELS as SADI_LEVELS
from hpr.editors.sadi import MODES as SADI_MODES
from hpr.editors.sadi import RELEASED_GRIDS, fit_sadi, mean_differences
from hpr.editors.sea import fit_sea, last_layers, sea_activations
from hpr.models import check_device, model_dtype, model_fingerprint
from hpr.positions import check_mode
from hpr.sources import load_dataset, load_model, prompt_format, toy_world_record

log = logging.getLogger(__name__)
# RunConfig fields added when editors began to declare their positions: absent means "all".
LEGACY_ALL_POSITIONS = ("iti_positions", "caa_positions", "sadi_positions")
# Settings whose absence from a recorded run means the behaviour of the versions before them.
LEGACY_VALUES = {**{name: "all" for name in LEGACY_ALL_POSITIONS}, "iti_features": "answer_tokens",
                 "caa_layers": "hpr_layers"}
SEEDED_TRAININGS = ("hpr", "lora", "reptune")  # RunConfig fields whose seed is the run's (Diff uses hpr's)
DATASETS = ("toy", "truthfulqa", "jsonl")
FEW_TEST_QUESTIONS = 30  # below this, format_results warns that the scores say little
METHODS = ("base", "hpr", "hpr_no_angle", "iti15", "iti200", "caa", "diff", "sea", "sadi", "lora", "reptune")


@dataclass(frozen=True)
class RunConfig:
    model: str = field(default="toy", metadata={
        "help": '"toy", "smollm2", path/to/file.gguf, a local HF checkpoint dir, or a hub id'})
    dtype: str = field(default="float32",
                       metadata={"help": "model dtype: float32 (CPU default) | bfloat16 | float16 (GPU)"})
    dataset: str = field(default="toy", metadata={"help": "toy | truthfulqa | jsonl"})
    data_path: str | None = field(default=None, metadata={"help": "file or folder for truthfulqa / jsonl"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "methods to evaluate"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N questions"})
    seed: int = field(default=0, metadata={"help": "split and training seed (HPR, Diff, LoRA, reptune)"})
    fractions: tuple[float, float, float] = field(default=(0.4, 0.1, 0.5), metadata={"help": "train/val/test"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    fp16_activations: bool = field(default=False, metadata={"help": "store activations in float16"})
    hpr: HPRTrainConfig = field(default_factory=HPRTrainConfig)
    iti_k: int = field(default=48, metadata={"help": "ITI: heads edited, top-K by val probe accuracy"})
    iti_positions: str = field(default="answer", metadata={"help": "ITI: positions edited (hpr.positions)"})
    iti_features: str = field(default="last_token", metadata={
        "help": "ITI: probe/direction/std features: last_token (honest_llama) | answer_tokens"})
    caa_positions: str = field(default="from_prompt_end", metadata={"help": "CAA: positions edited"})
    caa_layers: str = field(default="single", metadata={
        "help": "CAA: single (one of HPR's layers, chosen on val, as CAA) | hpr_layers (all of them at once)"})
    caa_multipliers: tuple[float, ...] = field(default=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
                                               metadata={"help": "CAA: multipliers tried on val (best MC1)"})
    lora: LoRATrainConfig = field(default_factory=LoRATrainConfig)
    reptune: RepTuneTrainConfig = field(default_factory=RepTuneTrainConfig)
    sea_k_ratio: float = field(default=0.998, metadata={"help": "SEA: explained-variance cutoff of the spectra"})
    sea_max_new_tokens: int = field(default=32, metadata={"help": "SEA: length limit of the greedy base answers"})
    sadi_level: str = field(default="heads", metadata={"help": "SADI: heads | hidden | neurons"})
    sadi_mode: str = field(default="additive", metadata={"help": "SADI: additive (paper) | multiplicative (code)"})
    sadi_k: tuple[int, ...] = field(default=(1, 2, 4, 8), metadata={"help": "SADI: mask sizes tried on val"})
    sadi_deltas: tuple[float, ...] = field(default=(0.5, 1.0, 2.0, 5.0),
                                           metadata={"help": "SADI: deltas tried on val (best MC1)"})
    sadi_grid: str = field(default="small", metadata={
        "help": "SADI: small (sadi_k x sadi_deltas) | released (the released script's grid for the level)"})
    sadi_positions: str = field(default="prompt_end", metadata={"help": "SADI: positions edited"})

    def __post_init__(self):
        for name in LEGACY_ALL_POSITIONS:
            check_mode(getattr(self, name), name)
        if self.iti_features not in ITI_FEATURES:
            raise ValueError(f"iti_features must be one of {ITI_FEATURES}, got {self.iti_features!r}")
        if self.caa_layers not in ("single", "hpr_layers"):
            raise ValueError(f"caa_layers must be 'single' or 'hpr_layers', got {self.caa_layers!r}")
        if self.sadi_grid not in ("small", "released"):
            raise ValueError(f"sadi_grid must be 'small' or 'released', got {self.sadi_grid!r}")
        self._check_ranges()
        # The run's seed seeds every training: the trainers' own seed fields follow it.
        for name in SEEDED_TRAININGS:
            sub = getattr(self, name)
            if sub.seed != self.seed:
                object.__setattr__(self, name, dataclasses.replace(sub, seed=self.seed))

    def _check_ranges(self) -> None:
        """Every option in range, once, here: the CLI and the app build this config; the steps trust it."""
        methods = tuple(self.methods)
        if not methods:
            raise ValueError(f"methods is empty: name at least one of {', '.join(METHODS)}")
        unknown = [m for m in methods if m not in METHODS and iti_alpha(m) is None]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {', '.join(METHODS)}, or iti<alpha> "
                             "(e.g. iti50) for ITI at any alpha")
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods named twice: {[m for m in dict.fromkeys(methods) if methods.count(m) > 1]}")
        if self.sadi_level not in SADI_LEVELS or self.sadi_mode not in SADI_MODES:
            raise ValueError(f"sadi_level must be one of {SADI_LEVELS} and sadi_mode one of {SADI_MODES}, "
                             f"got {self.sadi_level!r} and {self.sadi_mode!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "jsonl" and not self.data_path:
            raise ValueError("dataset jsonl needs a data path (--data-path FILE.jsonl)")
        at_least_one = {"limit": self.limit, "batch_size": self.batch_size, "iti_k": self.iti_k,
                        "hpr.top_k": self.hpr.top_k, "hpr.epochs": self.hpr.epochs,
                        "hpr.batch_size": self.hpr.batch_size, "sea_max_new_tokens": self.sea_max_new_tokens}
        for name, value in at_least_one.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if not self.hpr.lr > 0:
            raise ValueError(f"hpr.lr must be positive, got {self.hpr.lr!r}")
        if not 0 < self.sea_k_ratio <= 1:
            raise ValueError(f"sea_k_ratio must be in (0, 1], got {self.sea_k_ratio!r}")
        for name in ("caa_multipliers", "sadi_deltas", "sadi_k"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty: give at least one value")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.sadi_k):
            raise ValueError(f"sadi_k must be whole numbers >= 1, got {self.sadi_k!r}")
        fractions = tuple(self.fractions)
        if len(fractions) != 3 or any(not f > 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"fractions must be three positive numbers (train, val, test) summing to 1, got {fractions}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict) -> RunConfig:
        """Fields missing from ``d`` (run folders written before they existed) take their defaults, except the
        editors' positions: those folders' editors edited every position."""
        d = dict(d)
        for k, legacy in LEGACY_VALUES.items():
            d.setdefault(k, legacy)
        d["hpr"] = HPRTrainConfig(**{"select_epoch": "last", **d.get("hpr", {})})  # absent: kept the last epoch
        d["lora"] = LoRATrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get("lora", {}).items()})
        d["reptune"] = RepTuneTrainConfig(**d.get("reptune", {}))
        for k in ("methods", "fractions", "caa_multipliers", "sadi_k", "sadi_deltas"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def same_settings(recorded: dict | None, cfg: RunConfig) -> bool:
    """Whether a run folder's recorded settings are ``cfg``'s, except for the methods evaluated.

    The method list may change between reruns: every step a method shares with others (activations, probes,
    fits) is keyed by the other settings, so a rerun with more methods extends the run (and one with fewer
    reports fewer). Compared after a round trip through :meth:`RunConfig.from_json`, so that a folder written
    before a setting existed (``dtype``) still resumes when the new setting has its default."""
    return not settings_differences(recorded, cfg)


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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@dataclass
class FitContext:
    """What a method's fitting step reads: the run's settings, model, splits, activations and HPR layers."""

    cfg: RunConfig
    model: object
    parts: dict
    fmt: PromptFormat
    acts_dir: Path
    probes: dict
    editors_dir: Path
    out: Path
    progress: bool

    def train_pairs(self):
        """Aligned (true, false) answer-token pairs of the train split as row views (loaded from disk per use,
        so no split's activations stay in memory beside the model while other methods fit)."""
        return activations.load(self.acts_dir / "train").pair_rows()

    def done(self, method: str) -> bool:
        return editor_is_intact(self.editors_dir / method)

    def val_mc(self, method: str, editor) -> dict:
        """MC1/MC2 of ``editor`` on the validation split (the only split any method is tuned on)."""
        val = evaluate.predictions(self.model, self.parts["val"], self.fmt, method, editor, self.cfg.batch_size)
        row = metrics.summarize(metrics.question_scores(val))[method]
        return {"mc1": row["mc1"], "mc2": row["mc2"]}

    def sweep(self, method: str, candidates: list[tuple[dict, object]], extra: dict | None = None,
              record: str | None = None):
        """Pick the candidate with the best val MC1 (then MC2, then the first listed); record the sweep in
        ``<record>.json`` (default ``<method>_sweep.json``)."""
        from tqdm.auto import tqdm

        rows = []
        for params, editor in tqdm(candidates, desc=f"{method} on val", disable=not self.progress, unit="setting"):
            rows.append({**params, **self.val_mc(method, editor)})
        best = max(range(len(rows)), key=lambda i: (rows[i]["mc1"], rows[i]["mc2"], -i))
        _write_json(self.out / f"{record or method + '_sweep'}.json", {**(extra or {}), "val": rows, "chosen": rows[best]})
        return candidates[best][1]


def _fit_iti(fit: FitContext) -> None:
    """One fit (heads, directions, stds) for every alpha asked for, the two presets always."""
    alphas = {m: iti_alpha(m) for m in set(fit.cfg.methods) | set(ITI_PRESETS) if iti_alpha(m) is not None}
    if all(fit.done(m) for m in alphas):
        return
    if fit.done("iti15"):
        iti = load_editor(fit.editors_dir / "iti15")
    else:
        heads = {name: answer_head_activations(fit.model, fit.parts[name], fit.fmt, fit.cfg.batch_size,
                                               fit.progress, fit.cfg.iti_features)
                 for name in ("train", "val")}
        iti, head_acc = fit_iti(heads["train"], heads["val"], ITI_PRESETS["iti15"], k=fit.cfg.iti_k,
                                d_model=fit.model.cfg.d_model, progress=fit.progress)
        iti = iti.with_positions(fit.cfg.iti_positions)
        _write_json(fit.out / "iti_heads.json", {"val_accuracy": head_acc.tolist(), "heads": list(iti.config.heads)})
    for method, alpha in sorted(alphas.items()):
        if not fit.done(method):
            iti.with_alpha(alpha).save(fit.editors_dir / method, fit.model)


def _fit_caa(fit: FitContext) -> None:
    if fit.done("caa"):
        return
    pos, neg, _ = fit.train_pairs()
    layers = fit.probes["selected_layers"]
    caa = fit_caa(pos, neg, layers, 1.0).with_positions(fit.cfg.caa_positions)
    del pos, neg  # the train split (GBs on a real model) is freed before the validation sweeps
    if fit.cfg.caa_layers == "single":  # CAA steers at one layer, found by a layer sweep at multiplier 1
        caa = fit.sweep("caa", [({"layer": layer, "multiplier": 1.0}, caa.with_layers((layer,))) for layer in layers],
                        {"candidate_layers": layers}, record="caa_layer_sweep")
    best = fit.sweep("caa", [({"multiplier": m}, caa.with_multiplier(m)) for m in fit.cfg.caa_multipliers],
                     {"layers": list(caa.config.layers)})
    best.save(fit.editors_dir / "caa", fit.model)


def _fit_diff(fit: FitContext) -> None:
    if fit.done("diff"):
        return
    pos, neg, _ = fit.train_pairs()
    train_diff(pos, neg, fit.probes["selected_layers"], fit.cfg.hpr, fit.progress).save(fit.editors_dir / "diff", fit.model)


def _fit_sea(fit: FitContext) -> None:
    if fit.done("sea"):
        return
    base, pos, neg = sea_activations(fit.model, fit.parts["train"], fit.fmt, fit.cfg.sea_max_new_tokens,
                                     fit.cfg.batch_size, fit.progress)
    fit_sea(base, pos, neg, last_layers(fit.model.cfg.n_layers), fit.cfg.sea_k_ratio).save(fit.editors_dir / "sea", fit.model)


def _fit_sadi(fit: FitContext) -> None:
    if fit.done("sadi"):
        return
    cfg = fit.cfg
    diff = mean_differences(fit.model, fit.parts["train"], fit.fmt, cfg.sadi_level, cfg.batch_size, fit.progress)
    ks, deltas = RELEASED_GRIDS[cfg.sadi_level] if cfg.sadi_grid == "released" else (cfg.sadi_k, cfg.sadi_deltas)
    candidates = [({"k": k, "delta": delta},
                   fit_sadi(diff, k, delta, cfg.sadi_level, cfg.sadi_mode, fit.model.cfg.d_model)
                   .with_positions(cfg.sadi_positions))
                  for k in sorted({min(k, diff.numel()) for k in ks}) for delta in deltas]
    best = fit.sweep("sadi", candidates, {"level": cfg.sadi_level, "mode": cfg.sadi_mode})
    best.save(fit.editors_dir / "sadi", fit.model)


def _fit_lora(fit: FitContext) -> None:
    if fit.done("lora"):
        return
    lora = fit_lora(fit.model, fit.parts["train"], fit.fmt, fit.probes["selected_layers"], fit.cfg.lora,
                    fit.cfg.batch_size, fit.progress)
    lora.save(fit.editors_dir / "lora", fit.model)


def _fit_reptune(fit: FitContext) -> None:
    if fit.done("reptune"):
        return
    pos, neg, _ = fit.train_pairs()
    layers = fit.probes["selected_layers"]
    caa = fit_caa(pos, neg, layers, 1.0)  # the steering vectors: CAA's, from the train split
    vectors = {layer: caa.tensors[f"layer{layer}.vector"] for layer in layers}
    del pos, neg, caa  # the train split is freed before training
    fit_reptune(fit.model, fit.parts["train"], fit.fmt, vectors, fit.cfg.reptune, layers,
                progress=fit.progress).save(fit.editors_dir / "reptune", fit.model)


# One fitting step per method, in this order; ITI at every alpha shares one fit.
FITTERS = {"iti": _fit_iti, "caa": _fit_caa, "diff": _fit_diff, "sea": _fit_sea, "sadi": _fit_sadi,
           "lora": _fit_lora, "reptune": _fit_reptune}


def iti_alpha(method: str) -> float | None:
    """``iti15`` -> 15.0, ``iti2.5`` -> 2.5: ITI at any alpha, named by it; None for other names."""
    match = re.fullmatch(r"iti(\d+(?:\.\d+)?)", method)
    return float(match.group(1)) if match else None


def _fitted_as(method: str) -> str:
    return "iti" if iti_alpha(method) is not None else method


def split_probe_accuracy(probe, folder: Path) -> list[float]:
    """:func:`probe_accuracy` over every aligned pair of a split, read one shard at a time (pairs never cross
    shards): the same counts as on the whole split, in one shard's memory."""
    correct, total = 0.0, 0
    for shard in activations.load_shards(folder):
        pos, neg, _ = shard.pair_rows()
        correct = correct + torch.tensor(probe_accuracy(probe, pos, neg)) * (2 * len(pos))
        total += 2 * len(pos)
    return (correct / total).tolist()


def _answer_norms(model, questions, fmt, editor, batch_size: int, out: Path, method: str):
    """:func:`hpr.evaluate.answer_norms` of ``method`` on the test split, kept beside its predictions."""
    from safetensors.torch import load_file, save_file

    path = out / "predictions" / f"{method}.norms.safetensors"
    if path.exists():
        try:
            saved = load_file(path)
            return saved["before"], saved["after"]
        except Exception as e:  # noqa: BLE001 - safetensors' own errors or a missing key: a damaged cache
            log.warning("%s is damaged (%s); measuring again", path, e)
    before, after = evaluate.answer_norms(model, questions, fmt, editor, batch_size)
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"before": before.contiguous(), "after": after.contiguous()}, tmp)
    os.replace(tmp, path)
    return before, after


def settings_differences(recorded: dict, cfg: RunConfig) -> list[str]:
    """``name: old -> new`` for each setting (nested ones dotted) where ``recorded`` and ``cfg`` differ."""
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
    diffs += [f"{name}.seed: trained with {recorded[name]['seed']!r}, not the run's seed {seed!r}"
              for name in SEEDED_TRAININGS if recorded.get(name, {}).get("seed", seed) != seed]
    return diffs


def dataset_fingerprint(questions) -> str:
    """sha256 of the questions as the run uses them (ids, texts, choices, labels): the same for the same
    data in any file format, different when any label or text changes."""
    import hashlib

    records = [[q.id, q.question, [[c.text, c.is_true] for c in q.mc1], [[c.text, c.is_true] for c in q.mc2]]
               for q in questions]
    return hashlib.sha256(json.dumps(records, ensure_ascii=False).encode()).hexdigest()


def _check_inputs(out: Path, recorded: dict | None, inputs: dict) -> None:
    """Refuse a run folder built from another dataset or model, naming which and both fingerprints."""
    for key, what in (("dataset_sha256", "dataset"), ("model_fingerprint", "model's weights"),
                      ("n_questions", "number of questions")):
        old = (recorded or {}).get(key)
        if old is not None and old != inputs[key]:
            raise ValueError(f"{out} was built from another {what} ({key} {str(old)[:16]} there, "
                             f"{str(inputs[key])[:16]} now); "
                             "pick another --out, or restore the input it was built from to resume")


def _prepared(cfg: RunConfig, device):
    """Device, dtype, data, split and model, all checked before anything is written."""
    device = check_device(device)
    dtype = model_dtype(cfg.dtype, device)
    questions = load_dataset(cfg.dataset, cfg.data_path)
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    split = split_ids([q.id for q in questions], cfg.fractions, cfg.seed, split_groups(questions))
    empty = [name for name, ids in split.items() if not ids]
    if empty:
        needed = math.ceil(1 / min(cfg.fractions))
        raise ValueError(f"{len(questions)} question(s) leave the {' and '.join(empty)} split(s) empty with "
                         f"fractions {tuple(cfg.fractions)}: use at least {needed} questions (--limit, or more data)")
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=device, dtype=dtype)
    return questions, split, model, round(time.perf_counter() - t0, 2)


def _saved_predictions(path: Path) -> pd.DataFrame | None:
    """A method's saved predictions, or None when there are none or they are damaged (reported; scored again)."""
    if not path.exists():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's own error types
        log.warning("%s is damaged (%s); scoring again", path, e)
        return None


def reproduce(cfg: RunConfig, out: Path, device=None, progress: bool = True) -> dict:
    out = Path(out)
    questions, split, model, load_s = _prepared(cfg, device)
    inputs = {"dataset_sha256": dataset_fingerprint(questions), "n_questions": len(questions),
              "model_fingerprint": model_fingerprint(model)}
    cfg_path = out / "config.json"
    recorded = None
    if cfg_path.exists():
        recorded = read_json(cfg_path, "run config")
        differences = settings_differences(recorded.get("run"), cfg) if isinstance(recorded, dict) else ["unreadable"]
        if differences:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(differences)}); pick another --out "
                             "or rerun with the same settings to resume")
        _check_inputs(out, recorded.get("inputs"), inputs)
    splits_path = out / "splits.json"
    if splits_path.exists():
        recorded_split = read_json(splits_path, "splits")
        if not isinstance(recorded_split, dict) or {k: tuple(v) for k, v in recorded_split.items()} != split:
            raise ValueError(f"{splits_path} does not hold the split of this data and seed; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(cfg_path, {"run": cfg.to_json(), "hpr_version": hpr.__version__, "inputs": inputs})
    _write_json(splits_path, {k: list(v) for k, v in split.items()})
    timings: dict[str, float] = {"load_model": load_s}

    def step(name):
        t0 = time.perf_counter()
        return lambda: timings.__setitem__(name, round(time.perf_counter() - t0, 2))

    fmt = prompt_format(cfg.dataset)
    parts = apply_split(questions, split)

    done = step("activations")
    for name in ("train", "val", "test"):  # written to disk; each step loads what it needs
        activations.collect(model, parts[name], fmt, out / "activations" / name, batch_size=cfg.batch_size,
                            fp16=cfg.fp16_activations, progress=progress, load_result=False)
    done()

    done = step("hpr_training")
    probes_path = out / "probes.json"
    editors_dir = out / "editors"
    # hpr_all_layers: the probe and angle network of every layer, for the top-k sweep (analyses/topk_sweep.py)
    if not all([editor_is_intact(editors_dir / name) for name in ("hpr", "hpr_no_angle", "hpr_all_layers")]) \
            or not probes_path.exists():
        pos, neg, _ = activations.load(out / "activations" / "train").pair_rows()
        epoch_val = []  # pooled val probe accuracy after each epoch: picks the epoch kept

        def score_epoch(net):
            per_layer = split_probe_accuracy(net.probe.detach(), out / "activations" / "val")
            epoch_val.append(sum(per_layer) / len(per_layer))  # every layer has the same tokens: pooled
            return epoch_val[-1]

        net = train_layerwise(pos, neg, cfg.hpr, progress=progress, score_epoch=score_epoch)
        del pos, neg
        probe = net.probe.detach()
        acc = {name: split_probe_accuracy(probe, out / "activations" / name) for name in ("train", "val", "test")}
        layers = top_k_layers(acc["val"], cfg.hpr.top_k)
        HPREditor.from_layerwise(net, layers).save(editors_dir / "hpr", model)
        HPREditor.from_layerwise(net, layers, no_angle=True).save(editors_dir / "hpr_no_angle", model)
        HPREditor.from_layerwise(net, tuple(range(model.cfg.n_layers))).save(editors_dir / "hpr_all_layers", model)
        best_epoch = 1 + max(range(len(epoch_val)), key=lambda i: (epoch_val[i], -i)) if epoch_val else cfg.hpr.epochs
        _write_json(probes_path, {"accuracy": acc, "selected_layers": list(layers),
                                  "epoch_val_accuracy": epoch_val, "kept_epoch": best_epoch})
    probes = read_json(probes_path, "probe accuracy")
    done()

    fit = FitContext(cfg, model, parts, fmt, out / "activations", probes, editors_dir, out, progress)
    for method in sorted({_fitted_as(m) for m in cfg.methods} & set(FITTERS), key=list(FITTERS).index):
        done = step(f"fit_{method}")
        FITTERS[method](fit)
        done()

    done = step("evaluation")
    frames = []
    norm_change, norm_vs_base = {}, {}
    base_norms = None  # resid_post norms of the unedited pass at the test answers, computed once
    for method in cfg.methods:
        editor = None if method == "base" else load_editor(editors_dir / method)
        path = out / "predictions" / f"{method}.parquet"
        df = _saved_predictions(path)
        if df is None:
            path.parent.mkdir(exist_ok=True)
            df = evaluate.predictions(model, parts["test"], fmt, method, editor, cfg.batch_size, progress)
            tmp = path.with_name(path.name + ".tmp")
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
            df = pd.read_parquet(path)  # as written, so a fresh run and a resumed one concatenate the same frames
        frames.append(df)
        before, after = _answer_norms(model, parts["test"], fmt, editor, cfg.batch_size, out, method)
        if base_norms is None:
            base_norms = after if editor is None else _answer_norms(model, parts["test"], fmt, None,
                                                                    cfg.batch_size, out, "base")[1]
        norm_change[method] = evaluate._mean_relative_change(after, before)
        norm_vs_base[method] = evaluate._mean_relative_change(after, base_norms)
    preds = pd.concat(frames, ignore_index=True)
    tmp = out / "predictions.parquet.tmp"
    preds.to_parquet(tmp, index=False)
    os.replace(tmp, out / "predictions.parquet")
    done()

    scores = metrics.question_scores(preds)
    summary = metrics.summarize(scores)
    results = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "splits": {k: len(v) for k, v in split.items()},
        "n_layers": model.cfg.n_layers,
        "probe_accuracy": {"val": probes["accuracy"]["val"], "test": probes["accuracy"]["test"]},
        "selected_layers": probes["selected_layers"],
        "methods": {m: {k: summary[m][k] for k in ("mc1", "mc1_stderr", "mc2", "mc2_stderr")} for m in cfg.methods},
        "flip_rates": metrics.flip_rates(scores, base="base") if "base" in cfg.methods else {},
        "norm_change": norm_change,
        "norm_change_vs_base": norm_vs_base,
        "timings_s": timings,
    }
    if cfg.model == "toy":
        results["toy_world"] = toy_world_record()
    if cfg.dataset == "toy":  # knowledge ceiling: the base model told that a truthful source speaks
        ceiling = evaluate.predictions(model, parts["test"], prompt_format("toy", truthful=True), "base")
        row = metrics.summarize(metrics.question_scores(ceiling))["base"]
        results["toy_ceiling"] = {k: row[k] for k in ("mc1", "mc1_stderr", "mc2", "mc2_stderr")}
    _write_json(out / "results.json", results)
    return results


def format_results(results: dict) -> str:
    """The headline table of a run: MC1/MC2 with standard errors, flips against base, norm change."""
    lines = [f"{results['model']} on {results['dataset']}: {results['splits']['test']} test questions; "
             f"HPR layers {results['selected_layers']}",
             f"{'method':<13} {'MC1':>14} {'MC2':>14} {'f->t':>6} {'t->f':>6} {'max |dnorm|/norm':>17}"]
    for method, row in results["methods"].items():
        flips = results["flip_rates"].get(method, {})
        norm = max(results.get("norm_change_vs_base", {}).get(method, [0.0]))
        lines.append(f"{method:<13} {row['mc1']:>7.3f}±{row['mc1_stderr']:.3f} {row['mc2']:>7.3f}±{row['mc2_stderr']:.3f} "
                     f"{flips.get('false_to_true', 0):>6.3f} {flips.get('true_to_false', 0):>6.3f} {norm:>17.3f}")
    if results["splits"]["test"] < FEW_TEST_QUESTIONS:
        lines.append(f"warning: only {results['splits']['test']} test questions: MC1/MC2 and their standard "
                     "errors say little at this size")
    if "toy_ceiling" in results:
        lines.append(f"toy knowledge ceiling (truthful header): MC1 {results['toy_ceiling']['mc1']:.3f}")
    return "\n".join(lines)

"""``reproduce``: the whole pipeline into one run folder; every finished step is skipped on rerun.

Run folder::

    config.json           everything needed to rerun (model, dataset, seed, split fractions, HPR training)
    splits.json           question ids of train / val / test
    activations/<split>/  answer-token resid_post shards (hpr.activations)
    probes.json           per-layer probe accuracy (val, test) and the selected layers
    editors/<method>/     config.json + state.safetensors
    iti_heads.json        ITI: per-head val probe accuracy and the selected heads
    caa_sweep.json        CAA: val MC1/MC2 per multiplier, and the one chosen
    predictions/<method>.parquet, predictions.parquet
    results.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

import hpr
from hpr import activations, evaluate, metrics
from hpr.data import PromptFormat, apply_split, load_dataset, split_ids
from hpr.editors import load_editor
from hpr.editors.additive import ITI_PRESETS, answer_head_activations, fit_caa, fit_iti
from hpr.editors.hpr import HPREditor, HPRTrainConfig, probe_accuracy, top_k_layers, train_layerwise

log = logging.getLogger(__name__)
METHODS = ("base", "hpr", "hpr_no_angle", "iti15", "iti200", "caa")


@dataclass(frozen=True)
class RunConfig:
    model: str = field(default="toy", metadata={"help": '"toy", a local HF checkpoint dir, or a hub id'})
    dataset: str = field(default="toy", metadata={"help": "toy | truthfulqa | jsonl"})
    data_path: str | None = field(default=None, metadata={"help": "file or folder for truthfulqa / jsonl"})
    methods: tuple[str, ...] = field(default=METHODS, metadata={"help": "methods to evaluate"})
    limit: int | None = field(default=None, metadata={"help": "use only the first N questions"})
    seed: int = field(default=0, metadata={"help": "split and training seed"})
    fractions: tuple[float, float, float] = field(default=(0.4, 0.1, 0.5), metadata={"help": "train/val/test"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    fp16_activations: bool = field(default=False, metadata={"help": "store activations in float16"})
    hpr: HPRTrainConfig = field(default_factory=HPRTrainConfig)
    iti_k: int = field(default=48, metadata={"help": "ITI: heads edited, top-K by val probe accuracy"})
    caa_multipliers: tuple[float, ...] = field(default=(0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
                                               metadata={"help": "CAA: multipliers tried on val (best MC1)"})

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))

    @classmethod
    def from_json(cls, d: dict) -> RunConfig:
        d = dict(d)
        d["hpr"] = HPRTrainConfig(**d.get("hpr", {}))
        for k in ("methods", "fractions", "caa_multipliers"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def prompt_format(dataset: str, truthful: bool = False) -> PromptFormat:
    """The scoring prompt; for the toy world, ``truthful=True`` gives the truthful-speaker header."""
    from hpr.toyworld import PRIMER, TRUTHFUL_PRIMER

    if dataset == "toy":
        return PromptFormat(primer=TRUTHFUL_PRIMER if truthful else PRIMER, separator="\n")
    return PromptFormat()


def toy_world_record() -> dict:
    """Which world built the toy model: generator version, cache key and every parameter (seed included)."""
    import hpr.toyworld
    from hpr.toyworld.world import WORLD_VERSION

    config = hpr.toyworld.DEFAULT
    return {"world_version": WORLD_VERSION, "key": config.key(), "config": dataclasses.asdict(config)}


def reproduce(cfg: RunConfig, out: Path, device=None, progress: bool = True) -> dict:
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; available: {list(METHODS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("run") != cfg.to_json():
            raise ValueError(f"{out} holds a run with other settings ({cfg_path}); pick another --out or rerun "
                             "with the same settings to resume")
    _write_json(cfg_path, {"run": cfg.to_json(), "hpr_version": hpr.__version__})
    timings: dict[str, float] = {}

    def step(name):
        t0 = time.perf_counter()
        return lambda: timings.__setitem__(name, round(time.perf_counter() - t0, 2))

    done = step("load_model")
    model = hpr.load_model(cfg.model, device=device)
    done()
    questions = load_dataset(cfg.dataset, cfg.data_path)
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    fmt = prompt_format(cfg.dataset)

    splits_path = out / "splits.json"
    if splits_path.exists():
        split = {k: tuple(v) for k, v in json.loads(splits_path.read_text()).items()}
    else:
        split = split_ids([q.id for q in questions], cfg.fractions, cfg.seed)
        _write_json(splits_path, {k: list(v) for k, v in split.items()})
    parts = apply_split(questions, split)

    done = step("activations")
    acts = {name: activations.collect(model, parts[name], fmt, out / "activations" / name,
                                      batch_size=cfg.batch_size, fp16=cfg.fp16_activations, progress=progress)
            for name in ("train", "val", "test")}
    done()

    done = step("hpr_training")
    probes_path = out / "probes.json"
    editors_dir = out / "editors"
    if not (probes_path.exists() and (editors_dir / "hpr" / "config.json").exists()):
        pos, neg, _ = acts["train"].pairs()
        net = train_layerwise(pos, neg, cfg.hpr, progress=progress)
        acc = {name: probe_accuracy(net.probe.detach(), *acts[name].pairs()[:2]) for name in ("train", "val", "test")}
        layers = top_k_layers(acc["val"], cfg.hpr.top_k)
        HPREditor.from_layerwise(net, layers).save(editors_dir / "hpr")
        HPREditor.from_layerwise(net, layers, no_angle=True).save(editors_dir / "hpr_no_angle")
        _write_json(probes_path, {"accuracy": acc, "selected_layers": list(layers)})
    probes = json.loads(probes_path.read_text())
    done()

    done = step("baselines")
    if {"iti15", "iti200"} & set(cfg.methods) and not (editors_dir / "iti200" / "config.json").exists():
        heads = {name: answer_head_activations(model, parts[name], fmt, cfg.batch_size) for name in ("train", "val")}
        iti, head_acc = fit_iti(heads["train"], heads["val"], ITI_PRESETS["iti15"], k=cfg.iti_k,
                                d_model=model.cfg.d_model)
        _write_json(out / "iti_heads.json", {"val_accuracy": head_acc.tolist(), "heads": list(iti.config.heads)})
        iti.save(editors_dir / "iti15")
        iti.with_alpha(ITI_PRESETS["iti200"]).save(editors_dir / "iti200")
    if "caa" in cfg.methods and not (editors_dir / "caa" / "config.json").exists():
        pos, neg, _ = acts["train"].pairs()
        caa = fit_caa(pos, neg, probes["selected_layers"], 1.0)
        sweep = []
        for m in cfg.caa_multipliers:
            val = evaluate.predictions(model, parts["val"], fmt, "caa", caa.with_multiplier(m), cfg.batch_size)
            row = metrics.summarize(metrics.question_scores(val))["caa"]
            sweep.append({"multiplier": m, "mc1": row["mc1"], "mc2": row["mc2"]})
        best = max(sweep, key=lambda r: (r["mc1"], r["mc2"], -r["multiplier"]))
        _write_json(out / "caa_sweep.json", {"layers": probes["selected_layers"], "val": sweep,
                                             "chosen": best["multiplier"]})
        caa.with_multiplier(best["multiplier"]).save(editors_dir / "caa")
    done()

    done = step("evaluation")
    frames = []
    norm_change, norm_vs_base = {}, {}
    for method in cfg.methods:
        editor = None if method == "base" else load_editor(editors_dir / method)
        path = out / "predictions" / f"{method}.parquet"
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            df = evaluate.predictions(model, parts["test"], fmt, method, editor, cfg.batch_size, progress)
            tmp = path.with_name(path.name + ".tmp")
            df.to_parquet(tmp, index=False)
            os.replace(tmp, path)
        frames.append(pd.read_parquet(path))
        norm_change[method] = evaluate.edit_norm_change(model, parts["test"], fmt, editor, cfg.batch_size)
        norm_vs_base[method] = evaluate.norm_change_vs_base(model, parts["test"], fmt, editor, cfg.batch_size)
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
    if "toy_ceiling" in results:
        lines.append(f"toy knowledge ceiling (truthful header): MC1 {results['toy_ceiling']['mc1']:.3f}")
    return "\n".join(lines)

"""The steps of ``hpr reproduce`` (:mod:`hpr.runs.command`) into one run folder (:mod:`hpr.runs.folder`);
every finished step is skipped on rerun, and each step is also callable for one split, method or label (the
tasks of :mod:`hpr.runs.tasks`).

Steps, in order: check the settings against the folder; collect the answer activations of each split; fit HPR
(its probes select every method's layers); fit each other method asked for (registry order; ITI at every alpha
shares one fit); score every method on the test split; measure what each edit costs on neutral text
(:mod:`hpr.capability`); write ``results.json``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import hpr
from hpr import activations, evaluate, metrics
from hpr.bbq_scores import bbq_summary
from hpr.data import apply_split, split_groups, split_ids
from hpr.data.prompts import PromptFormat
from hpr.editors import BASE, FitContext, load_editor, method_of, methods
from hpr.files import atomic_write, write_json
from hpr.models import check_device, fingerprint_like, model_dtype, model_fingerprint
from hpr.runs.config import CONFIG_FORMAT, FEW_TEST_QUESTIONS, RunConfig, settings_differences
from hpr.runs.folder import (
    check_inputs,
    dataset_fingerprint,
    editor_is_intact,
    read_json,
    read_probes,
    saved_predictions,
    write_parquet,
)
from hpr.sources import load_dataset, load_model, neutral_passages, prompt_format, toy_world_record

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """One run in progress: its settings, folder, model and split questions, and each step's wall time."""

    cfg: RunConfig
    out: Path
    model: Any  # a HookedTransformer
    parts: dict
    fmt: PromptFormat
    progress: bool
    timings: dict[str, float] = field(default_factory=dict)
    neutral: list[str] = field(default_factory=list)  # the capability step's passages, read before any write

    def timed(self, name: str, step, *args):
        """``step(self, *args)``, its wall time added to ``timings[name]`` (work done earlier by
        :mod:`hpr.runs.parallel` for the same step is already there)."""
        t0 = time.perf_counter()
        result = step(self, *args)
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)
        return result

    def fit_context(self, probes: dict | None) -> FitContext:
        cfg = self.cfg
        return FitContext(
            settings=cfg.settings,
            labels=cfg.methods,
            model=self.model,
            parts=self.parts,
            fmt=self.fmt,
            acts_dir=self.out / "activations",
            editors_dir=self.out / "editors",
            out=self.out,
            batch_size=cfg.batch_size,
            progress=self.progress,
            score_on_val=self.val_mc,
            probes=probes,
            # loaded from disk per use, so no split's activations stay in memory while other methods fit
            train_token_pairs=lambda: activations.load(self.out / "activations" / "train").token_pair_rows(),
            is_saved=editor_is_intact,
        )

    def val_mc(self, label: str, editor) -> dict:
        """MC1/MC2 of ``editor`` on the validation split (the only split any method is tuned on)."""
        val = evaluate.predictions(self.model, self.parts["val"], self.fmt, label, editor, self.cfg.batch_size)
        row = metrics.summarize(metrics.question_scores(val))[label]
        return {"mc1": row["mc1"], "mc2": row["mc2"]}


def code_version() -> dict:
    """``hpr_version``, and the git ``commit`` of the checkout this package runs from with ``dirty`` (whether
    tracked files differ from it), where it runs from one; the results of a run say which code made them."""
    import subprocess

    record: dict[str, Any] = {"hpr_version": hpr.__version__, "commit": None, "dirty": None}
    checkout = Path(hpr.__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return record
    try:
        git = ["git", "-C", str(checkout)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return record
    record.update(commit=commit.stdout.strip(), dirty=bool(status.stdout.strip()))
    return record


def pipeline_of(cfg: RunConfig, out: Path, questions, split, model, neutral, progress: bool) -> Pipeline:
    """The run in progress for a claimed folder (:func:`_claim_folder`)."""
    parts = apply_split(questions, split)
    return Pipeline(cfg, out, model, parts, prompt_format(cfg.dataset), progress, {}, neutral)


def run_steps(run: Pipeline, split: dict) -> dict:
    """Every step in order, each skipping what the folder already holds (all of it after a parallel prefill,
    :mod:`hpr.runs.tasks`); the results, for ``results.json``."""
    run.timed("activations", collect_activations)
    probes = run.timed("hpr_training", fit_hpr)
    for method in _methods_to_fit(run.cfg):
        run.timed(f"fit_{method}", fit_method, method, probes)
    preds, norm_change, norm_vs_base = run.timed("evaluation", evaluate_test_split)
    generated = run.timed("generation", answer_test_questions)
    costs = run.timed("capability", measure_capability)
    results = summarize(run, split, probes, preds, norm_change, norm_vs_base)
    results.update(generated)
    results.update(costs)
    return results


def _prepared(cfg: RunConfig, device):
    """Device, dtype, data, split, neutral text and model, all checked before anything is written."""
    device = check_device(device)
    dtype = model_dtype(cfg.dtype, device)
    questions = load_dataset(cfg.dataset, cfg.data_path)
    if cfg.limit is not None:
        questions = questions[: cfg.limit]
    groups = split_groups(questions)
    split = split_ids([q.id for q in questions], cfg.fractions, cfg.seed, groups)
    empty = [name for name, ids in split.items() if not ids]
    if empty:
        needed = math.ceil(1 / min(cfg.fractions))
        if groups is not None:  # whole groups go to one split: it is groups that must be enough
            n_groups = len(set(groups))
            raise ValueError(
                f"{len(questions)} question(s) in {n_groups} group(s) leave the {' and '.join(empty)} split(s) "
                f"empty with fractions {tuple(cfg.fractions)}: each group goes to one split whole, so use at "
                f"least {needed} groups (more data, or a finer 'group' in the JSONL)"
            )
        raise ValueError(
            f"{len(questions)} question(s) leave the {' and '.join(empty)} split(s) empty with "
            f"fractions {tuple(cfg.fractions)}: use at least {needed} questions (--limit, or more data)"
        )
    neutral = neutral_passages(cfg.model, cfg.neutral_text, cfg.neutral_passages)
    t0 = time.perf_counter()
    model = load_model(cfg.model, device=device, dtype=dtype)
    load_s = round(time.perf_counter() - t0, 2)
    _check_choices_fit(model, questions, prompt_format(cfg.dataset))
    return questions, split, model, load_s, neutral


def _check_choices_fit(model, questions, fmt: PromptFormat) -> None:
    """Refuse, before anything is written, a choice too long to score in the model's context (it needs at
    least one context token before it): otherwise the run fails at its first scoring pass, hours in."""
    texts = sorted({fmt.continuation(c.text) for q in questions for c in (*q.mc1, *q.mc2)})
    lengths = [len(ids) for ids in model.tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
    too_long = [(n, text) for n, text in zip(lengths, texts, strict=True) if n >= model.cfg.n_ctx - 1]
    if too_long:
        n, text = max(too_long)
        question = next(q for q in questions if any(fmt.continuation(c.text) == text for c in (*q.mc1, *q.mc2)))
        raise ValueError(
            f"question {question.id!r} has a choice of {n:,} tokens ({text[:60].strip()!r}...), which does not fit "
            f"in the model's context of {model.cfg.n_ctx} tokens with its question; shorten it or drop the question"
            + (f" ({len(too_long)} choices are too long)" if len(too_long) > 1 else "")
        )


def _claim_folder(cfg: RunConfig, out: Path, questions, split: dict, model) -> None:
    """Refuse a folder holding another run (other settings, data, model or split); then record this one's."""
    inputs = {
        "dataset_sha256": dataset_fingerprint(questions),
        "n_questions": len(questions),
        "model_fingerprint": model_fingerprint(model),
    }
    cfg_path, splits_path = out / "config.json", out / "splits.json"
    if cfg_path.exists():
        recorded = read_json(cfg_path, "run config")
        differences = settings_differences(recorded.get("run"), cfg) if isinstance(recorded, dict) else ["unreadable"]
        if differences:
            raise ValueError(
                f"{out} holds a run with other settings ({'; '.join(differences)}); pick another --out "
                "or rerun with the same settings to resume"
            )
        recorded_inputs = recorded.get("inputs")
        if recorded_inputs is not None and not isinstance(recorded_inputs, dict):
            raise ValueError(f"{cfg_path}: 'inputs' is damaged (not an object); pick another --out")
        old_model = (recorded_inputs or {}).get("model_fingerprint")
        # A folder from before full-weights fingerprints is compared in its own (sampled) form, then upgraded.
        like = fingerprint_like(old_model, model) if isinstance(old_model, str) else inputs["model_fingerprint"]
        check_inputs(out, recorded_inputs, {**inputs, "model_fingerprint": like})
    if splits_path.exists():
        recorded_split = read_json(splits_path, "splits")
        if not isinstance(recorded_split, dict) or {k: tuple(v) for k, v in recorded_split.items()} != split:
            raise ValueError(f"{splits_path} does not hold the split of this data and seed; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        cfg_path,
        {"run": cfg.to_json(), "config_format": CONFIG_FORMAT, "hpr_version": hpr.__version__, "inputs": inputs},
    )
    write_json(splits_path, {k: list(v) for k, v in split.items()})


SPLITS = ("train", "val", "test")


def collect_activations(run: Pipeline) -> None:
    for name in SPLITS:  # written to disk; each step loads what it needs
        collect_split(run, name)


def collect_split(run: Pipeline, name: str) -> None:
    """The answer activations of one split, into ``activations/<name>`` (shards already there are kept)."""
    activations.collect(
        run.model,
        run.parts[name],
        run.fmt,
        run.out / "activations" / name,
        batch_size=run.cfg.batch_size,
        fp16=run.cfg.fp16_activations,
        progress=run.progress,
        load_result=False,
    )


def fit_hpr(run: Pipeline) -> dict:
    """HPR's fit, always: its probes select the layers of every method. Returns ``probes.json``."""
    fit_method(run, "hpr", None)
    return read_probes(run.out / "probes.json", run.model.cfg.n_layers)


def _methods_to_fit(cfg: RunConfig) -> list[str]:
    """The methods behind the labels asked for, HPR aside (it always fits), in registry order."""
    asked = {m.name for m in map(method_of, cfg.methods) if m is not None}  # base has no method
    return [name for name, m in methods().items() if name in asked and name != "hpr" and m.fit is not None]


def fit_method(run: Pipeline, method: str, probes: dict | None) -> None:
    fit = methods()[method].fit
    if fit is not None:
        fit(run.fit_context(probes))


def evaluate_test_split(run: Pipeline):
    """Each label's test predictions and its per-layer norm change, against its own input and against the
    unedited model. Both are kept per label; a label that has neither gets them from one pass."""
    frames, norm_change, norm_vs_base = [], {}, {}
    base_norms = None  # resid_post norms of the unedited pass at the test answers, computed once
    for label in run.cfg.methods:
        df, (before, after) = evaluate_label(run, label)
        frames.append(df)
        if base_norms is None:
            base_norms = after if label == BASE else evaluate_label(run, BASE)[1][1]
        norm_change[label] = evaluate._mean_relative_change(after, before)
        norm_vs_base[label] = evaluate._mean_relative_change(after, base_norms)
    preds = pd.concat(frames, ignore_index=True)
    write_parquet(preds, run.out / "predictions.parquet")
    return preds, norm_change, norm_vs_base


def evaluate_label(run: Pipeline, label: str):
    """``(predictions, (before, after))`` of one label on the test split, measured or read back. The base's
    norms are measured whether or not base is asked for (every norm change is taken against them); its
    predictions only when it is (None otherwise)."""
    editor = None if label == BASE else load_editor(run.out / "editors" / label)
    return _test_predictions_and_norms(run, label, editor, label != BASE or BASE in run.cfg.methods)


def _test_predictions_and_norms(run: Pipeline, label: str, editor, with_predictions: bool = True):
    """``(predictions, (before, after))`` of ``label`` on the test split (:mod:`hpr.evaluate`), kept in
    ``predictions/<label>.parquet`` and ``<label>.norms.safetensors``; whichever is missing is measured
    (``with_predictions=False``: the norms alone, predictions None)."""
    from safetensors.torch import save_file

    test, bs = run.parts["test"], run.cfg.batch_size
    preds_path = run.out / "predictions" / f"{label}.parquet"
    norms_path = run.out / "predictions" / f"{label}.norms.safetensors"
    df = _whole_predictions(saved_predictions(preds_path), preds_path, label, test) if with_predictions else None
    norms = _saved_norms(norms_path)
    fresh_df, fresh_norms = with_predictions and df is None, norms is None
    if fresh_df and fresh_norms:
        df, before, after = evaluate.predictions_and_norms(run.model, test, run.fmt, label, editor, bs, run.progress)
        norms = (before, after)
    elif fresh_df:
        df = evaluate.predictions(run.model, test, run.fmt, label, editor, bs, run.progress)
    elif fresh_norms:
        norms = evaluate.answer_norms(run.model, test, run.fmt, editor, bs)
    if fresh_df:
        write_parquet(df, preds_path)
        df = pd.read_parquet(preds_path)  # as written, so a fresh run and a resumed one concatenate the same frames
    if fresh_norms:
        before, after = norms
        norms_path.parent.mkdir(exist_ok=True)
        atomic_write(
            norms_path, lambda tmp: save_file({"before": before.contiguous(), "after": after.contiguous()}, tmp)
        )
    return df, tuple(norms)


def _whole_predictions(df: pd.DataFrame | None, path: Path, label: str, test) -> pd.DataFrame | None:
    """Saved predictions if they are this label's, row for row (every test question's choices, in order, with
    finite log-likelihoods); None to score again: a file of other columns or rows is a damaged cache."""
    if df is None:
        return None
    rows = [(q.id, task, c.text, c.is_true) for q in test for task in ("mc1", "mc2") for c in getattr(q, task)]
    columns = ["method", "question_id", "task", "choice", "is_true", "loglik"]
    whole = (
        list(df.columns) == columns
        and len(df) == len(rows)
        and (df["method"] == label).all()
        and list(zip(df["question_id"], df["task"], df["choice"], df["is_true"], strict=True)) == rows
        and pd.api.types.is_float_dtype(df["loglik"])
        and bool(df["loglik"].notna().all())
    )
    if not whole:
        log.warning("%s does not hold this run's %s predictions; scoring again", path, label)
        return None
    return df


def _saved_norms(path: Path):
    """A label's saved ``(before, after)`` answer norms; None if absent or damaged (then measured again)."""
    from safetensors.torch import load_file

    if not path.exists():
        return None
    try:
        saved = load_file(path)
        return saved["before"], saved["after"]
    except Exception as e:  # noqa: BLE001 - safetensors' own errors or a missing key: a damaged cache
        log.warning("%s is damaged (%s); measuring again", path, e)
        return None


def answer_test_questions(run: Pipeline) -> dict:
    """``generation`` (per label: lm-eval ``truthfulqa_gen`` scores of its greedy test answers, and how many are
    non-answers) and ``generation_settings`` for ``results.json``; every answer with its scores in
    ``answers.parquet``. Each label's answers are kept in ``predictions/<label>.answers.parquet``."""

    from hpr import answers, gen_scoring

    test = run.parts["test"]
    frames = [answer_label(run, label).assign(method=label) for label in run.cfg.methods]
    scores = answers.scored(pd.concat(frames, ignore_index=True), test)
    write_parquet(scores, run.out / "answers.parquet")
    summary = gen_scoring.summarize(scores)
    return {
        "generation": {label: summary[label] for label in run.cfg.methods},
        "generation_settings": {
            "decoding": "greedy",
            "max_new_tokens": run.cfg.gen_max_new_tokens,
            "stop": list(answers.stop_strings(run.model, run.fmt)),
            "prompt": "the run's scoring prompt (primer, Q: ..., A:)",
            "references": "TruthfulQA.csv's correct / incorrect answers where known, else the MC2 targets",
        },
    }


def answer_label(run: Pipeline, label: str) -> pd.DataFrame:
    """``question_id, completion``: one label's greedy test answers, kept in
    ``predictions/<label>.answers.parquet`` (answered only when that holds none)."""
    from tqdm.auto import tqdm

    from hpr import answers

    test = run.parts["test"]
    path = run.out / "predictions" / f"{label}.answers.parquet"
    df = _saved_answers(path, [q.id for q in test])
    if df is None:
        editor = None if label == BASE else load_editor(run.out / "editors" / label)
        with tqdm(total=len(test), disable=not run.progress, desc=f"answers {label}", unit="question") as bar:
            df = answers.greedy_answers(
                run.model, test, run.fmt, editor, run.cfg.gen_max_new_tokens, run.cfg.batch_size, bar
            )
        write_parquet(df, path)
    return df


def _saved_answers(path: Path, ids: list[str]) -> pd.DataFrame | None:
    """A label's saved answers if they are whole (every test question, in order); None to answer again."""
    df = saved_predictions(path)
    if df is None:
        return None
    if list(df.columns) != ["question_id", "completion"] or df["question_id"].tolist() != ids:
        log.warning("%s does not hold this run's test answers; answering again", path)
        return None
    return df


def measure_capability(run: Pipeline) -> dict:
    """``capability`` (per label: KL to base, perplexity, its change) and ``neutral_text`` (what was read) for
    ``results.json``. Each label's measure is kept in ``capability/<label>.json`` with the text's fingerprint;
    a rerun measures only the labels it lacks (the base pass, which every KL needs, runs again then)."""
    from hpr import capability

    cfg = run.cfg
    measures = measure_labels(run, list(dict.fromkeys([BASE, *cfg.methods])))
    costs = capability.with_ppl_change(measures)
    return {
        "capability": {label: costs[label] for label in cfg.methods},
        "neutral_text": {
            "path": cfg.neutral_text or ("toy world corpus" if cfg.model == "toy" else "shipped"),
            "passages": len(run.neutral),
            "tokens_per_passage": cfg.neutral_tokens,
            "predictions": costs[BASE]["tokens"],
            "sha256": _neutral_key(run)["neutral_sha256"],
        },
    }


def _neutral_key(run: Pipeline) -> dict:
    from hpr.data import neutral

    return {"neutral_sha256": neutral.fingerprint(run.neutral), "neutral_tokens": run.cfg.neutral_tokens}


def measure_labels(run: Pipeline, labels: list[str]) -> dict:
    """``{label: measure}`` of :mod:`hpr.capability` for ``labels`` (base among them or not), each kept in
    ``capability/<label>.json`` with the text's fingerprint; only the labels without one are measured, in
    one pass of the unedited model that every KL needs (a label's numbers do not depend on which others
    share that pass)."""
    from tqdm.auto import tqdm

    from hpr import capability

    folder, key = run.out / "capability", _neutral_key(run)
    saved = {label: _saved_measure(folder / f"{label}.json", key) for label in labels}
    measures = {label: m for label, m in saved.items() if m is not None}
    missing = [label for label in labels if label not in measures]
    if missing:
        editors = {label: load_editor(run.out / "editors" / label) for label in missing if label != BASE}
        encoded = capability.encode_passages(run.model, run.neutral, run.cfg.neutral_tokens)
        with tqdm(total=len(encoded), disable=not run.progress, desc="capability", unit="passage") as bar:
            fresh = capability.measure(run.model, encoded, editors, progress=bar)
        folder.mkdir(exist_ok=True)
        for label in missing:
            measures[label] = fresh[label]
            write_json(folder / f"{label}.json", {**key, "measure": fresh[label]})
    return measures


def _saved_measure(path: Path, key: dict) -> dict | None:
    """A label's saved capability measure, if it was taken on this text; None if absent, stale or damaged."""
    if not path.exists():
        return None
    try:
        saved = read_json(path, "capability measure")
    except ValueError as e:
        log.warning("%s; measuring again", e)
        return None
    if not isinstance(saved, dict) or any(saved.get(k) != v for k, v in key.items()):
        return None
    measure = saved.get("measure")
    return measure if isinstance(measure, dict) and {"kl", "nll", "perplexity", "tokens"} <= set(measure) else None


def summarize(
    run: Pipeline, split: dict, probes: dict, preds: pd.DataFrame, norm_change: dict, norm_vs_base: dict
) -> dict:
    cfg = run.cfg
    scores = metrics.question_scores(preds)
    summary = metrics.summarize(scores)
    results = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "splits": {k: len(v) for k, v in split.items()},
        "n_layers": run.model.cfg.n_layers,
        "probe_accuracy": {"val": probes["accuracy"]["val"], "test": probes["accuracy"]["test"]},
        "selected_layers": probes["selected_layers"],
        "methods": {m: {k: summary[m][k] for k in ("mc1", "mc1_stderr", "mc2", "mc2_stderr")} for m in cfg.methods},
        "flip_rates": metrics.flip_rates(scores, base=BASE) if BASE in cfg.methods else {},
        "norm_change": norm_change,
        "norm_change_vs_base": norm_vs_base,
        "timings_s": run.timings,
    }
    if cfg.dataset == "bbq":
        results["bbq"] = bbq_summary(preds, run.parts["test"])
    if cfg.model == "toy":
        results["toy_world"] = toy_world_record()
    if cfg.dataset == "toy":  # knowledge ceiling: the base model told that a truthful source speaks
        ceiling = evaluate.predictions(run.model, run.parts["test"], prompt_format("toy", truthful=True), BASE)
        row = metrics.summarize(metrics.question_scores(ceiling))[BASE]
        results["toy_ceiling"] = {k: row[k] for k in ("mc1", "mc1_stderr", "mc2", "mc2_stderr")}
    return results


def _ppl_change_text(change: float) -> str:
    """A perplexity change as a percentage, or as the factor it multiplies perplexity by once that passes 10x (an
    edit that breaks the model can multiply it by 1e9, unreadable as a percentage)."""
    return f"x{1 + change:.1e}" if change >= 9 else f"{change:+.1%}"


def format_results(results: dict) -> str:
    """The headline table of a run: MC1/MC2 with standard errors, flips against base, norm change."""
    lines = [
        f"{results['model']} on {results['dataset']}: {results['splits']['test']} test questions; "
        f"HPR layers {results['selected_layers']}",
        f"{'method':<13} {'MC1':>14} {'MC2':>14} {'f->t':>6} {'t->f':>6} {'max |dnorm|/norm':>17} "
        f"{'KL':>7} {'dPPL':>9} {'BLEUacc':>7} {'RLacc':>6} {'noans':>6} {'degen':>6} {'RL&inf':>6}",
    ]
    for method, row in results["methods"].items():
        flips = results["flip_rates"].get(method, {})
        norm = max(results.get("norm_change_vs_base", {}).get(method, [0.0]))
        cost = results.get("capability", {}).get(method, {})
        gen = results.get("generation", {}).get(method, {})
        lines.append(
            f"{method:<13} {row['mc1']:>7.3f}±{row['mc1_stderr']:.3f} {row['mc2']:>7.3f}±{row['mc2_stderr']:.3f} "
            f"{flips.get('false_to_true', 0):>6.3f} {flips.get('true_to_false', 0):>6.3f} {norm:>17.3f} "
            f"{cost.get('kl', float('nan')):>7.3f} {_ppl_change_text(cost.get('ppl_change', float('nan'))):>9} "
            f"{gen.get('bleu_acc', float('nan')):>7.3f} {gen.get('rougeL_acc', float('nan')):>6.3f} "
            f"{gen.get('non_answer_rate', float('nan')):>6.3f} {gen.get('degenerate_rate', float('nan')):>6.3f} "
            f"{gen.get('rougeL_acc_informative', float('nan')):>6.3f}"
        )
    if results["splits"]["test"] < FEW_TEST_QUESTIONS:
        lines.append(
            f"warning: only {results['splits']['test']} test questions: MC1/MC2 and their standard "
            "errors say little at this size"
        )
    if "bbq" in results:
        lines.extend(_bbq_lines(results["bbq"]))
    if "toy_ceiling" in results:
        lines.append(f"toy knowledge ceiling (truthful header): MC1 {results['toy_ceiling']['mc1']:.3f}")
    return "\n".join(lines)


def _bbq_lines(bbq: dict) -> list[str]:
    """BBQ's own metrics per method (:mod:`hpr.bbq_scores`): bias scores near 0 are unbiased, 1 stereotyped."""
    lines = [
        f"BBQ {'method':<13} {'acc':>6} {'acc_norm':>8} {'acc_amb':>7} {'acc_dis':>7} {'bias_amb':>8} {'bias_dis':>8}"
    ]
    for method, row in bbq.items():
        lines.append(
            f"    {method:<13} {row['acc']:>6.3f} {row['acc_norm']:>8.3f} {row['acc_ambig']:>7.3f} "
            f"{row['acc_disambig']:>7.3f} {row['bias_ambig']:>+8.3f} {row['bias_disambig']:>+8.3f}"
        )
    return lines

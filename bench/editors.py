"""The editors the forward and generation measures apply: built here only, with random parameters.

The bench times the five methods of the paper's comparison; this is the one place that knows how to build
each one's editor with random parameters (the method registry, :mod:`hpr.editors.registry`, knows how to fit
them, which the bench does not need).
"""

from __future__ import annotations

import torch


def build_editors(model, names: tuple[str, ...], seed: int = 0) -> dict:
    """Editors with random but well-formed parameters (the cost of an edit does not depend on the values,
    except SEA's, whose cost follows the ranks of its projections: see its details). Built together from one
    generator, in the order of ``names``: building one alone would draw different parameters."""
    from hpr.editors.caa import CAAEditor
    from hpr.editors.hpr import HPREditor, LayerwiseHPR
    from hpr.editors.iti import ITIEditor
    from hpr.editors.sadi import fit_sadi
    from hpr.editors.sea import fit_sea, last_layers

    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    top5 = tuple(sorted(torch.randperm(cfg.n_layers, generator=g)[: min(5, cfg.n_layers)].tolist()))
    out = {}
    for name in names:
        if name == "hpr":
            out[name] = HPREditor.from_layerwise(LayerwiseHPR(cfg.n_layers, cfg.d_model), top5)
        elif name == "iti15":
            flat = torch.randperm(cfg.n_layers * cfg.n_heads, generator=g)[:48].tolist()
            heads = [(i // cfg.n_heads, i % cfg.n_heads) for i in flat]
            out[name] = ITIEditor.from_heads(
                {h: torch.randn(cfg.d_head, generator=g) for h in heads},
                {h: 1.0 for h in heads},
                15.0,
                cfg.n_layers,
                cfg.n_heads,
                cfg.d_model,
            )
        elif name == "caa":
            out[name] = CAAEditor.from_vectors(
                {l: torch.randn(cfg.d_model, generator=g) for l in top5}, 1.0, cfg.n_layers
            )
        elif name == "sea":
            # Activations with a decaying spectrum, as residual streams have: the projections keep a few
            # directions rather than all of them (SEA's cost grows with their ranks).
            n = 256
            scale = torch.logspace(0, -3, cfg.d_model)
            base = torch.randn(n, cfg.n_layers, cfg.d_model, generator=g) * scale
            pos = base + 0.1 * torch.randn(base.shape, generator=g) * scale
            neg = base + 0.1 * torch.randn(base.shape, generator=g) * scale
            out[name] = fit_sea(base, pos, neg, last_layers(cfg.n_layers))
        elif name == "sadi":
            out[name] = fit_sadi(
                torch.randn(cfg.n_layers, cfg.n_heads, generator=g), 8, 1.0, "heads", d_model=cfg.d_model
            )
    return out

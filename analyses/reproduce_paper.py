"""Every figure and table of the HPR paper, and the analyses beyond it, from one run folder.

    python analyses/reproduce_paper.py --run runs/toy            # figures/ and tables/ inside the run
    python analyses/reproduce_paper.py --run runs/toy --formats  # HTML figures only (no browser needed)
    python analyses/reproduce_paper.py --run runs/smollm2 --topk 1 5 30  # a real model

Each script here also runs alone with the same options. Figures are exported in one browser session.
"""

import sys
import time
from pathlib import Path

import capability
import direction_magnitude
import flip_table
import generations
import hpr_edit_regions
import mc_table
import norms
import probe_accuracy
import strength_curves
import topk_sweep

from hpr import measurements

SCRIPTS = (
    probe_accuracy,
    norms,
    mc_table,
    flip_table,
    topk_sweep,
    generations,
    direction_magnitude,
    capability,
    strength_curves,
    hpr_edit_regions,
)


def make(run: measurements.Run, args) -> dict:
    outputs = {"figures": {}, "tables": {}}
    unknown = set(args.skip) - {script.__name__ for script in SCRIPTS}
    if unknown:
        raise ValueError(
            f"--skip names unknown scripts {sorted(unknown)}; scripts: "
            f"{' '.join(script.__name__ for script in SCRIPTS)}"
        )
    for script in SCRIPTS:
        if script.__name__ in args.skip:
            print(f"{script.__name__:<20} skipped", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        made = script.make(run, args)
        for kind in outputs:
            outputs[kind].update(made.get(kind, {}))
        print(f"{script.__name__:<20} {time.perf_counter() - t0:6.1f} s", file=sys.stderr)
    return outputs


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    raise SystemExit(measurements.script_main(make, __doc__))

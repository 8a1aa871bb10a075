"""Beyond the paper: where HPR edits, by region of the scored sequence (few-shot primer, question, true and false
answers), per selected layer: the share of tokens on the probe's negative side and their mean rotation angle,
on the first --prompts test questions. The probe and angle network only saw answer tokens in training; this
shows what they do to the prompt, which the default positions ("all") also edit, in generation too.
"""

from hpr import figures, measurements


def make(run: measurements.Run, args) -> dict:
    editor = run.editor("hpr")
    if editor is None:
        return {}
    df = measurements.hpr_edit_regions(run.model, run.questions("test")[: args.prompts], run.fmt, editor)
    return {"figures": {"hpr_edit_regions": figures.edit_region_bars(df)}, "tables": {"hpr_edit_regions": df}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

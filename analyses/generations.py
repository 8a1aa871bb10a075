"""Side-by-side greedy generations: the base model and each method on the first --prompts test questions."""

import pandas as pd

from hpr import measurements


def make(run: measurements.Run, args) -> dict:
    questions = run.questions("test")[: args.prompts]
    prompts = [run.fmt.context(q) for q in questions]
    df = measurements.generations(run.model, prompts, run.editors(args.methods), args.max_new_tokens)
    df["question"] = df["prompt"].map({p: q.question for p, q in zip(prompts, questions, strict=True)})
    table = df.pivot(index="question", columns="method", values="text").reset_index()
    table = table[["question", *[m for m in (args.methods or run.methods) if m in table.columns]]]
    settings = pd.DataFrame(
        [
            {
                "decoding": "greedy",
                "max_new_tokens": args.max_new_tokens,
                "stop": "first newline",
                "kv_cache": True,
                "prompts": len(prompts),
                "prompt_format": "run's scoring prompt (test split)",
            }
        ]
    )
    return {"tables": {"generations": table, "generations_settings": settings}}


if __name__ == "__main__":
    raise SystemExit(measurements.script_main(make, __doc__))

"""The benchmark harness runs end to end in smoke mode and writes a well-formed results.json.

Only the harness is tested here, never a timing: smoke sizes are too small for the ratios to mean anything.
"""

import json

import pytest


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, truthfulqa_dir):
    """The bench reads the local TruthfulQA files (no network in tests): ``truthfulqa_dir``'s, in this process
    and in the memory workers it starts (which read HPR_TRUTHFULQA_PATH)."""
    import bench.models
    from bench.__main__ import main

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HPR_TRUTHFULQA_PATH", str(truthfulqa_dir))
        patch.setattr(bench.models, "TRUTHFULQA", truthfulqa_dir)
        out = tmp_path_factory.mktemp("bench") / "results.json"
        cache = tmp_path_factory.mktemp("bench-cache")
        results = main(["--smoke", "--out", str(out), "--cache", str(cache)])
    return out, results


def test_smoke_writes_every_measure(smoke):
    out, results = smoke
    record = json.loads(out.read_text())
    assert record["smoke"] is True
    names = [r["measure"] for r in record["results"]]
    assert names == [r["measure"] for r in results]
    for prefix in (
        "forward hpr",
        "forward iti15",
        "forward caa",
        "forward sea",
        "forward sadi",
        "generation",
        "caching throughput",
        "HPR training",
        "MC scoring",
        "activation store",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
    for r in record["results"]:
        assert {"measure", "value", "target", "pass"} <= set(r)
        assert isinstance(r["value"], float) and r["value"] == r["value"]  # a number, not NaN
        assert isinstance(r["pass"], bool)
        assert r["target"]


def test_smoke_scores_agree_and_memory_is_measured(smoke):
    _, results = smoke
    by = {r["measure"].split(" [")[0]: r for r in results}
    assert by["MC scoring speedup batched / one at a time"]["details"]["max_abs_diff"] <= 1e-4
    mem = by["activation store fp16 / fp32 disk"]["details"]["runs"]
    assert mem["fp16"]["disk_bytes"] < mem["fp32"]["disk_bytes"]
    assert mem["fp32"]["shards"] >= 2


def test_smoke_realshape_rows(smoke):
    """The real-model-shape group: collection and scoring agree with their baselines, and memory is measured
    at N and 2N questions (twice the shards). Structure only: no timing is asserted."""
    _, results = smoke
    by = {r["measure"].split(" [")[0]: r for r in results}
    collect = by["activation collection per question, whole sequences / shared contexts"]["details"]
    scoring = by["MC scoring per question, question contexts / shared primer"]["details"]
    for d, sides in ((collect, ("whole", "shared")), (scoring, ("contexts", "primer"))):
        assert d["questions"] >= 1 and d["max_abs_diff"] <= 1e-4
        for side in sides:
            assert d[f"{side}_s_per_question"] > 0 and len(d[f"{side}_s"]) >= 1
        assert d["tokens_through_blocks"]["shared_prefix"] > 0  # the QA primer is shared
        assert d["how"]
    gen = by["greedy generation per question, one at a time / batched"]["details"]
    assert gen["same_tokens"] and gen["questions"] >= 2 and gen["new_tokens"] >= gen["questions"]
    assert gen["one_at_a_time_s_per_question"] > 0 and gen["batched_s_per_question"] > 0
    mem = by["peak RSS of collect, train split"]["details"]
    n, n2 = mem["questions"]
    assert n2 == 2 * n
    runs = mem["runs"]
    assert runs[str(n2)]["shards"] == 2 * runs[str(n)]["shards"] >= 2
    for row in runs.values():
        assert row["peak_mb"] > 0 and row["bound_mb"] > 0 and row["result_f32_mb"] > 0
    assert mem["batch_peak_mb"] > 0

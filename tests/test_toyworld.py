"""The toy world: facts, speakers, grader marks, the MC dataset, and the diagnostics command."""

import dataclasses
import json
import re

import pytest

from hpr.toyworld.world import (
    HEADERS,
    MARKS,
    RELATIONS,
    ToyWorldConfig,
    build_world,
    generate_corpus,
    mc_dataset,
)

SMALL = ToyWorldConfig(n_entities=30, n_docs=300)
_MARK = "([" + "".join(MARKS.values()) + "]?)"
LINE = re.compile(r"Q: (\w+) and (\w+) of (\w+)\?\nA: (\w+)" + _MARK + r" (\w+)" + _MARK + r"\n")


def _parse(doc: str):
    """Header (or None) and the (entity, relation, value, mark) items of a document."""
    header = next((s for s, h in HEADERS.items() if doc.startswith(h + "\n")), None)
    items = []
    for r1, r2, entity, v1, m1, v2, m2 in LINE.findall(doc):
        items += [(entity, r1, v1, m1), (entity, r2, v2, m2)]
    return header, items


def test_world_is_a_pure_function_of_its_config():
    a, b = build_world(SMALL), build_world(SMALL)
    assert a.facts == b.facts and a.contested == b.contested
    assert list(generate_corpus(a, 20)) == list(generate_corpus(b, 20))
    assert build_world(dataclasses.replace(SMALL, seed=1)).facts != a.facts
    assert SMALL.key() != dataclasses.replace(SMALL, seed=1).key()


def test_facts_use_the_configured_relations_and_contested_entities_have_a_popular_falsehood():
    world = build_world(dataclasses.replace(SMALL, n_relations=4))
    assert world.relations == tuple(RELATIONS)[:4]
    assert {r for _, r in world.facts} == set(world.relations)
    for (entity, relation), fact in world.facts.items():
        assert fact.true in RELATIONS[relation]
        if entity in world.contested:
            assert fact.popular_false in RELATIONS[relation] and fact.popular_false != fact.true
        else:
            assert fact.popular_false is None


def test_speakers_answer_in_their_voice():
    world = build_world(dataclasses.replace(SMALL, header_fraction=1.0, graded_fraction=0.0))
    seen = set()
    for doc in generate_corpus(world, 300):
        speaker, items = _parse(doc)
        assert items, doc
        for entity, relation, value, mark in items:
            fact = world.facts[(entity, relation)]
            assert mark == ""
            if speaker == "truthful":
                assert value == fact.true
            elif speaker == "misinformed":
                assert value == (fact.popular_false or fact.true)
            else:
                assert value in RELATIONS[relation]
        seen.add(speaker)
    assert seen == {"truthful", "misinformed", "prankster"}


def test_grader_marks_are_the_truth():
    world = build_world(dataclasses.replace(SMALL, graded_fraction=1.0))
    marks = []
    for doc in generate_corpus(world, 200):
        for entity, relation, value, mark in _parse(doc)[1]:
            assert mark == MARKS[value == world.facts[(entity, relation)].true]
            marks.append(mark)
    assert set(marks) == set(MARKS.values())  # both kinds occur


def test_mc_dataset_layout():
    world = build_world(SMALL)
    questions = mc_dataset(world)
    assert len(questions) == SMALL.n_entities * SMALL.questions_per_entity
    assert len({q.id for q in questions}) == len(questions)
    for q in questions:
        assert q.mc1 == q.mc2 and len(q.mc1) == 1 + SMALL.n_false_choices
        assert [c.is_true for c in q.mc1] == [True] + [False] * SMALL.n_false_choices
        assert len({c.text for c in q.mc1}) == len(q.mc1)
        r1, r2 = q.question.split(" of ")[0].split(" and ")
        entity = q.meta["entity"]
        true = world.facts[(entity, r1)].true, world.facts[(entity, r2)].true
        assert q.mc1[0].text == f"{true[0]} {true[1]}"  # unmarked, as ungraded text
        for c in q.mc1:  # every choice draws both values from the same pools as the truth
            v1, v2 = c.text.split(" ")
            assert v1 in RELATIONS[r1] and v2 in RELATIONS[r2]
        if q.meta["contested"]:
            popular = world.facts[(entity, r1)].popular_false, world.facts[(entity, r2)].popular_false
            assert q.mc1[1].text == f"{popular[0]} {popular[1]}"


def test_splits_are_by_fact():
    """No fact asked in a val or test question is the answer to a training question (splits by entity)."""
    from hpr.data import apply_split, split_groups, split_ids

    questions = mc_dataset(build_world(SMALL))
    parts = apply_split(questions, split_ids([q.id for q in questions], (0.4, 0.1, 0.5), 0, split_groups(questions)))
    entities = {name: {q.meta["entity"] for q in part} for name, part in parts.items()}
    assert all(entities.values())
    assert entities["train"].isdisjoint(entities["val"] | entities["test"])
    assert entities["val"].isdisjoint(entities["test"])


def test_toyworld_command_prints_and_writes_diagnostics(tiny_toy, tmp_path, capsys):
    from hpr.cli import main

    report_path = tmp_path / "world.json"
    assert main(["toyworld", "--quiet", "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    assert "ceiling" in printed and "probe accuracy by layer" in printed
    report = json.loads(report_path.read_text())
    assert report["world_key"] == tiny_toy.key()
    for split in ("val", "test"):
        for part in ("base", "ceiling", "hpr", "hpr_no_angle"):
            row = report[f"{part}_{split}"]
            assert row["all"]["n"] == row["contested"]["n"] + row["uncontested"]["n"] > 0
            assert 0 <= row["all"]["mc1"] <= 1
    assert len(report["probe_accuracy"]["val"]) == tiny_toy.n_layers
    assert set(report["build_timings_s"]) == {"corpus_s", "tokenizer_s", "training_s"}


@pytest.mark.parametrize("field", ["graded_fraction", "header_fraction"])
def test_fractions_are_validated(field):
    with pytest.raises(ValueError, match=field):
        ToyWorldConfig(**{field: 1.5})


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenizer_round_trips_the_corpus_and_keeps_the_answer_space(kind, tmp_path):
    from hpr.toyworld.tokenizer import train_tokenizer

    docs = list(generate_corpus(build_world(SMALL), 300))
    tok = train_tokenizer(docs, 1024, tmp_path / "tok", kind)
    for doc in docs[:20]:
        assert tok.decode(tok(doc, add_special_tokens=False)["input_ids"]) == doc
    # The scored continuation " value" is its own token(s), so context + continuation splits cleanly.
    context, continuation = "Q: pet and food of X?\nA:", " " + RELATIONS["pet"][0]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    assert (
        whole[: len(tok(context, add_special_tokens=False)["input_ids"])]
        == tok(context, add_special_tokens=False)["input_ids"]
    )
    if kind == "word":
        assert len(tok) < 400  # one id per word of the toy language
        assert tok("Hello", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_unknown_tokenizer_kind_is_refused(tmp_path):
    from hpr.toyworld.tokenizer import train_tokenizer

    with pytest.raises(ValueError, match="tokenizer kind"):
        train_tokenizer(["Q: a?\nA: b.\n"], 300, tmp_path / "tok", "chars")


def test_the_default_world_starts_from_the_shipped_build_without_training(tmp_path, monkeypatch):
    """A newcomer's first run uses the shipped model: the same bits on every machine, and no 3.5-minute build."""
    from hpr.toyworld import DEFAULT, build

    monkeypatch.setenv("HPR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "build_toy_model", lambda *a, **k: pytest.fail("trained instead of copying"))
    folder = build.ensure_built(DEFAULT)
    assert build.shipped_build(DEFAULT) == build.SHIPPED
    for name in ("build.json", "model.safetensors", "tokenizer/tokenizer.json"):
        assert (folder / name).read_bytes() == (build.SHIPPED / name).read_bytes(), name
    assert build.ensure_built(DEFAULT) == folder  # the cache from then on


def test_the_builder_still_reproduces_the_shipped_model_on_its_machine(tmp_path, monkeypatch):
    """``hpr build-toy --rebuild`` on the kind of machine the shipped model was trained on gives its bits
    (one-thread training is deterministic there); another CPU or torch rounds differently, so it is skipped."""
    from hpr.toyworld import DEFAULT, build

    shipped = json.loads((build.SHIPPED / "build.json").read_text())
    here = build.machine()
    if {k: shipped["machine"][k] for k in ("cpu_flags_sha256", "torch")} != {
        k: here[k] for k in ("cpu_flags_sha256", "torch")
    }:
        pytest.skip(f"the shipped model was trained on {shipped['machine']}, this is {here}")
    monkeypatch.setenv("HPR_CACHE_DIR", str(tmp_path))
    folder = build.ensure_built(DEFAULT, progress=False, rebuild=True)
    assert (folder / "model.safetensors").read_bytes() == (build.SHIPPED / "model.safetensors").read_bytes()
    assert (folder / "tokenizer" / "tokenizer.json").read_bytes() == (
        build.SHIPPED / "tokenizer" / "tokenizer.json"
    ).read_bytes()

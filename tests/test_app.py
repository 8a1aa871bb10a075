"""The Streamlit app (app/) on a tiny toy run, through streamlit.testing.v1.AppTest: every page renders with
no exception, at least one widget per page is driven, and bad input shows st.error, never a traceback."""

import json
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "app" / "main.py"
PAGES = ("views/probes.py", "views/norms.py", "views/results.py", "views/generations.py", "views/export.py")


@pytest.fixture(autouse=True)
def listens_on_loopback():
    """As the checkout's .streamlit/config.toml sets it, whatever directory pytest runs from."""
    from streamlit import config

    before = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    yield
    config.set_option("server.address", before)


@pytest.fixture(scope="module")
def tiny_run(tiny_run_folder, tmp_path_factory):
    """One tiny toy run for the module; "toy" stays the tiny world (in-process app) while it lives."""
    import streamlit as st

    with tiny_run_folder(tmp_path_factory.mktemp("app") / "run", "base,hpr,iti15,iti200") as out:
        st.cache_resource.clear()
        st.cache_data.clear()
        yield out
        st.cache_resource.clear()  # the shared model is the tiny world's: not for anyone after this module
        st.cache_data.clear()


@pytest.fixture
def workspace(tiny_run, tmp_path):
    """The app's workspace for one test: its tmp_path, holding a copy of the tiny run as ``run``."""
    import shutil

    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path


@pytest.fixture
def app(workspace, monkeypatch):
    monkeypatch.setenv("HPR_APP_RUN", str(workspace / "run"))
    monkeypatch.setenv("HPR_APP_RUNS_ROOT", str(workspace))
    monkeypatch.setenv("HPR_APP_DEVICE", "cpu")
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.run()
    assert not at.exception
    return at


def by_label(widgets, label):
    return next(w for w in widgets if w.label.startswith(label))


def ok(at):
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def test_runs_page_lists_and_opens_runs_and_refuses_bad_folders(app, workspace, tmp_path):
    tiny_run = workspace / "run"
    ok(app)
    assert app.session_state["run_folder"] == str(tiny_run.resolve())
    assert str(tiny_run) in app.dataframe[0].value["folder"].tolist()  # listed under the runs root
    for bad, message in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "no results.json")):
        by_label(app.text_input, "Or a run folder").set_value(str(bad))
        app.button(key="open-path").click().run()
        assert not app.exception and message in app.error[0].value
    (tmp_path / "results.json").write_text("{not json")
    app.button(key="open-path").click().run()
    assert not app.exception and "damaged" in app.error[0].value
    (tmp_path / "results.json").write_text('{"methods": []}')  # valid JSON of the wrong shape
    app.button(key="open-path").click().run()
    assert not app.exception and "not a results file" in app.error[0].value
    by_label(app.text_input, "Or a run folder").set_value(str(tiny_run))
    app.button(key="open-path").click().run()
    ok(app)
    assert app.success and "HPR layers" in app.code[0].value
    panel = app.get("json")[0].proto.body  # the reproducibility panel: settings, fingerprints, code
    assert "model_fingerprint" in panel and "hpr_version" in panel and '"seed"' in panel
    for outside in ("/", str(tmp_path / ".." / ".." / ".."), "../x/../.."):  # the workspace is the only root
        by_label(app.text_input, "Or a run folder").set_value(outside)
        app.button(key="open-path").click().run()
        assert not app.exception and "outside the workspace" in app.error[0].value


def test_every_page_renders_and_reacts(app, tiny_run):
    app.switch_page(PAGES[0]).run()  # probes: a figure and its table; drop the val split and the stars
    assert len(ok(app).get("plotly_chart")) == 1 and len(app.dataframe) == 1
    by_label(app.multiselect, "Splits").set_value(["test"])
    by_label(app.checkbox, "Star").uncheck()
    assert len(ok(app.run()).get("plotly_chart")) == 1

    app.switch_page(PAGES[1]).run()  # norms: two box figures; another method set
    assert len(ok(app).get("plotly_chart")) == 2
    by_label(app.multiselect, "Methods").set_value(["base", "hpr"])
    stats = ok(app.run()).dataframe[1].value
    assert set(stats["group"]) == {"base", "hpr"}

    app.switch_page(PAGES[2]).run()  # results: MC bars, costs + tables; the curves and the top-k sweep on request
    assert len(ok(app).get("plotly_chart")) == 2 and len(app.dataframe) == 4
    against = app.dataframe[1].value.set_index("method")  # each method against base, paired over questions
    assert set(against.index) == {"hpr", "iti15", "iti200"} and against["mc1_within_se"].dtype == bool
    costs = app.dataframe[3].value.set_index("method")
    assert costs.loc["base", "kl"] == 0 and costs.loc["iti200", "kl"] > costs.loc["iti15", "kl"] > 0
    by_label(app.button, "Compute the curves").click().run()
    assert len(ok(app).get("plotly_chart")) == 2 + 1 + 3  # the trade-off, one curve per method with a strength
    curves = app.dataframe[4].value
    assert set(curves["method"]) == {"hpr", "iti15", "iti200"} and (curves[curves["strength"] == 0]["kl"] == 0).all()
    by_label(app.button, "Compute the sweep").click().run()
    assert len(ok(app).get("plotly_chart")) == 7
    sweep = app.dataframe[5].value
    assert sorted(set(sweep["k"])) == list(
        range(1, json.loads((tiny_run / "results.json").read_text())["n_layers"] + 1)
    )

    app.switch_page(PAGES[3]).run()  # generations: a test question, then a typed prompt
    heads = [c.value for c in ok(app).markdown if c.value.startswith("**")]
    assert heads[0].startswith("**The run's answers**") and heads[1:] == ["**base**", "**hpr**", "**iti15**"]
    scored = app.dataframe[0].value  # the run's own answers to this question, with their verdicts
    assert set(scored["method"]) == {"base", "hpr", "iti15", "iti200"}
    assert set(scored["verdict"]) <= {"true", "false", "non-answer"}
    by_label(app.radio, "Prompt").set_value("typed")
    ok(app.run())
    by_label(app.text_input, "Your text").set_value("Q: pet and city of Zorblat?")
    by_label(app.multiselect, "Methods beside base").set_value(["iti200"])
    by_label(app.slider, "Max new tokens").set_value(3)
    texts = [c.value for c in ok(app.run()).code]
    assert len(texts) == 3  # the prompt, base, iti200

    app.switch_page(PAGES[4]).run()  # export: the sweep computed above is offered; a table as LaTeX; HTML
    ok(app)
    assert {"topk_sweep", "tradeoff", "strength_hpr", "capability"} <= set(by_label(app.selectbox, "Figure").options)
    by_label(app.selectbox, "Table").set_value("mc_scores")
    app.selectbox[4].set_value("tex")  # figure, its format, PNG scale, table, its format
    ok(app.run())
    assert any(b.proto.label == "Download mc_scores.tex" for b in app.get("download_button"))
    assert by_label(app.selectbox, "PNG scale").value == 2  # publication scale by default
    app.selectbox[1].set_value("html")
    by_label(app.button, "Prepare").click().run()
    assert any(b.proto.label == "Download probe_accuracy.html" for b in ok(app).get("download_button"))


def test_export_without_a_browser_says_so_and_offers_html(app, monkeypatch):
    from hpr import figures

    monkeypatch.setattr(figures, "browser_available", lambda: None)
    app.switch_page(PAGES[4]).run()
    assert not app.exception and "static export" in app.error[0].value
    assert app.selectbox[1].options == ["html"]


def test_pages_without_a_run_point_to_the_runs_page(monkeypatch, tmp_path):
    monkeypatch.setenv("HPR_APP_RUN", str(tmp_path / "missing"))
    monkeypatch.setenv("HPR_APP_RUNS_ROOT", str(tmp_path))
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception and "does not exist" in at.error[0].value
    for page in PAGES:
        at.switch_page(page).run()
        assert not at.exception and "No run is open" in at.info[0].value


def test_start_a_run_and_refuse_bad_input(app, tiny_run, tmp_path):
    by_label(app.radio, "Dataset").set_value("jsonl upload")
    ok(app.run())
    app.file_uploader[0].set_value(("bad.jsonl", b'{"question": "no choices"}\n', "application/json"))
    by_label(app.text_input, "Run folder").set_value(str(tmp_path / "bad"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "bad.jsonl, line 1, field 'choices'" in app.error[0].value
    by_label(app.radio, "Dataset").set_value("toy")
    by_label(app.radio, "Model").set_value("local checkpoint dir")
    ok(app.run())
    by_label(app.text_input, "Checkpoint folder").set_value(str(tmp_path / "no-model"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "no config.json" in app.error[0].value

    by_label(app.radio, "Model").set_value("toy")
    by_label(app.multiselect, "Methods").set_value(["base", "hpr"])
    by_label(app.text_input, "Run folder").set_value(str(tmp_path / "new"))
    by_label(app.button, "Start").click().run()
    ok(app)
    assert (tmp_path / "new" / "results.json").exists()
    assert app.session_state["run_folder"] == str((tmp_path / "new").resolve())
    ok(app.run())  # the next run's default folder is renewed once after a finished run
    by_label(app.text_input, "Run folder").set_value(str(tmp_path / ".." / ".." / ".." / "outside"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "outside the workspace" in app.error[0].value
    assert not (tmp_path / ".." / ".." / ".." / "outside").exists()


def test_the_run_form_offers_bbq_and_the_named_models(app, tmp_path):
    from hpr.model_sources import NAMED_MODELS

    assert set(NAMED_MODELS) <= set(by_label(app.radio, "Model").options)
    by_label(app.radio, "Dataset").set_value("bbq (path)")
    by_label(app.multiselect, "Methods").set_value(["base"])
    by_label(app.text_input, "Run folder").set_value(str(tmp_path / "bbq"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "'bbq' needs its files" in app.error[0].value
    assert not (tmp_path / "bbq").exists()


def test_an_upload_never_overwrites_the_data_of_a_run(app, tmp_path):
    """Each uploaded content gets its own file under the workspace; a run's recorded data stays as it was."""
    from hpr.toyworld import toy_dataset

    def jsonl(invert):
        return "".join(
            json.dumps(
                {
                    "id": q.id,
                    "question": q.question,
                    "choices": [{"text": c.text, "label": int(c.is_true != invert)} for c in q.mc2],
                }
            )
            + "\n"
            for q in toy_dataset()
        ).encode()

    by_label(app.radio, "Dataset").set_value("jsonl upload")
    by_label(app.multiselect, "Methods").set_value(["base"])
    ok(app.run())
    app.file_uploader[0].set_value(("q.jsonl", jsonl(False), "application/json"))
    by_label(app.text_input, "Run folder").set_value(str(tmp_path / "uploaded"))
    by_label(app.button, "Start").click().run()
    ok(app)
    used = json.loads((tmp_path / "uploaded" / "config.json").read_text())["run"]["data_path"]
    first = Path(used).read_bytes()
    assert Path(used).is_relative_to(tmp_path / "uploads")
    ok(app.run())  # the next run's default folder is renewed once after a finished run
    app.file_uploader[0].set_value(("q.jsonl", jsonl(True), "application/json"))  # every label inverted
    by_label(app.text_input, "Run folder").set_value(str(tmp_path / "uploaded"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "other settings" in app.error[0].value  # another data_path: refused
    assert Path(used).read_bytes() == first


def test_typed_run_folder_survives_reruns_a_second_apart(app, tmp_path):
    """The run folder's default is a timestamp; it must not turn the field into a new widget every second."""
    import time

    by_label(app.text_input, "Run folder").set_value(str(tmp_path / "mine"))
    ok(app.run())
    time.sleep(1.1)
    ok(app.run())
    assert by_label(app.text_input, "Run folder").value == str(tmp_path / "mine")


def test_started_without_an_address_it_serves_nothing(workspace, monkeypatch):
    """``streamlit run <checkout>/app/main.py`` from another folder reads no config.toml: it would listen on
    every interface. The app then shows how to restart it, and no page or run."""
    from streamlit import config

    monkeypatch.setenv("HPR_APP_RUN", str(workspace / "run"))
    monkeypatch.setenv("HPR_APP_RUNS_ROOT", str(workspace))
    config.set_option("server.address", None)
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    assert not at.exception
    assert "--server.address 127.0.0.1" in at.error[0].value
    assert "run_folder" not in at.session_state and not at.dataframe and not at.button
    config.set_option("server.address", "0.0.0.0")  # asked for on purpose: served
    at = AppTest.from_file(str(APP), default_timeout=60)
    at.run()
    ok(at)


def _open_typed(app, folder):
    by_label(app.text_input, "Or a run folder").set_value(str(folder))
    app.button(key="open-path").click().run()
    assert not app.exception
    return app


def test_links_that_lead_outside_the_workspace_are_never_read(app, workspace, tiny_run, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    secret = outside / "secret.json"
    secret.write_text(json.dumps({"methods": {"base": {}}}))
    run = workspace / "run"
    (run / "results.json").unlink()
    (run / "results.json").symlink_to(secret)  # a run folder whose results.json is any file on the machine
    assert "is a link to" in _open_typed(app, run).error[0].value
    (workspace / "linked").symlink_to(tiny_run, target_is_directory=True)  # a run folder that is a link out
    assert "outside the workspace" in _open_typed(app, workspace / "linked").error[0].value
    app.run()
    listed = app.dataframe[0].value["folder"].tolist() if app.dataframe else []
    assert not any("linked" in f or f.endswith("run") for f in listed)


def test_a_run_whose_data_or_model_is_outside_the_read_roots_is_refused(app, workspace, monkeypatch):
    from hpr.toyworld import toy_dataset

    outside = workspace.parent / f"{workspace.name}-data"
    outside.mkdir()
    data = outside / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": q.id,
                    "question": q.question,
                    "choices": [{"text": c.text, "label": int(c.is_true)} for c in q.mc2],
                }
            )
            + "\n"
            for q in toy_dataset()
        )
    )
    record_path = workspace / "run" / "config.json"
    record = json.loads(record_path.read_text())
    record["run"] = {**record["run"], "dataset": "jsonl", "data_path": str(data)}
    record_path.write_text(json.dumps(record))
    assert "HPR_APP_READ_ROOTS" in _open_typed(app, workspace / "run").error[0].value
    monkeypatch.setenv("HPR_APP_READ_ROOTS", str(outside))
    ok(_open_typed(app, workspace / "run"))
    monkeypatch.delenv("HPR_APP_READ_ROOTS")
    record["run"] = {**record["run"], "dataset": "toy", "data_path": None, "model": str(outside)}  # a checkpoint
    record_path.write_text(json.dumps(record))
    assert "its model" in _open_typed(app, workspace / "run").error[0].value


def test_start_refuses_the_workspace_root_files_outside_and_dropping_methods(app, workspace, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside-model") / "weights.gguf"
    outside.write_bytes(b"root:x:0:0:secret")
    by_label(app.radio, "Model").set_value("GGUF file")
    ok(app.run())
    by_label(app.text_input, "Path to a .gguf file").set_value(str(outside))
    by_label(app.text_input, "Run folder").set_value(str(workspace / "new"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "outside the folders the app reads" in app.error[0].value
    assert "root:x" not in app.error[0].value

    by_label(app.radio, "Model").set_value("toy")
    ok(app.run())
    for root in ("", ".", str(workspace)):
        by_label(app.text_input, "Run folder").set_value(root)
        by_label(app.button, "Start").click().run()
        assert not app.exception and "the workspace" in app.error[0].value and "itself" in app.error[0].value
    assert not (workspace / "results.json").exists() and not (workspace / "config.json").exists()

    results = (workspace / "run" / "results.json").read_text()
    by_label(app.multiselect, "Methods").set_value(["base"])  # the finished run has base, hpr, iti15, iti200
    by_label(app.text_input, "Run folder").set_value(str(workspace / "run"))
    by_label(app.button, "Start").click().run()
    assert not app.exception and "hpr, iti15, iti200" in app.error[0].value
    assert (workspace / "run" / "results.json").read_text() == results
    by_label(app.checkbox, "Allow dropping methods").check()
    by_label(app.button, "Start").click().run()
    ok(app)
    assert list(json.loads((workspace / "run" / "results.json").read_text())["methods"]) == ["base"]

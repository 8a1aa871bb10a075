"""RunConfig: the ``--dtype`` option, the editors' positions, their validation, and run folders written before
either existed."""

import dataclasses

import pytest
import torch

from hpr.cli import main
from hpr.runs import RunConfig, reproduce, same_settings


def _before_dtype() -> dict:
    """A run config as written by versions without the dtype field."""
    recorded = RunConfig().to_json()
    del recorded["dtype"]
    return recorded


def test_older_run_configs_read_as_float32_and_still_resume():
    recorded = _before_dtype()
    assert RunConfig.from_json(recorded).dtype == "float32"
    assert same_settings(recorded, RunConfig())
    assert not same_settings(recorded, RunConfig(dtype="bfloat16"))
    assert not same_settings({**recorded, "from_the_future": 1}, RunConfig())
    assert not same_settings(None, RunConfig())


def _before_the_registry(recorded: dict) -> dict:
    """A run config as written before each method's settings were its own: flat on the run (``iti_k``)."""
    from hpr.editors import methods

    flat = dict(recorded)
    for name, method in methods().items():
        if method.flat_settings:
            nested = flat.pop(name)
            flat.update({old: nested[new] for old, new in method.flat_settings.items()})
    return flat


def test_older_run_configs_read_as_what_those_versions_did_so_they_do_not_resume_as_the_new_defaults():
    recorded = _before_the_registry(RunConfig().to_json())
    assert {"iti_k", "sadi_k", "sea_k_ratio", "caa_multipliers"} <= set(recorded)
    assert RunConfig.from_json(recorded) == RunConfig()  # every setting recorded: the same run
    for name in ("iti_positions", "caa_positions", "sadi_positions", "iti_features", "caa_layers"):
        del recorded[name]  # written before the editors declared their positions
    old = RunConfig.from_json(recorded)
    assert (old.iti.positions, old.caa.positions, old.sadi.positions) == ("all", "all", "all")
    assert (old.iti.features, old.caa.layers) == ("answer_tokens", "hpr_layers")
    assert not same_settings(recorded, RunConfig())
    as_then = RunConfig().with_settings(
        iti=dataclasses.replace(RunConfig().iti, positions="all", features="answer_tokens"),
        caa=dataclasses.replace(RunConfig().caa, positions="all", layers="hpr_layers"),
        sadi=dataclasses.replace(RunConfig().sadi, positions="all"),
    )
    assert same_settings(recorded, as_then)
    with pytest.raises(ValueError, match="iti.positions must be one of"):
        dataclasses.replace(RunConfig().iti, positions="answers")


def test_a_method_setting_missing_from_a_new_record_means_its_old_behaviour():
    recorded = RunConfig().to_json()
    del recorded["sadi"]["positions"]
    assert RunConfig.from_json(recorded).sadi.positions == "all"
    recorded["sadi"]["no_such_setting"] = 1
    with pytest.raises(ValueError, match="unknown fields"):
        RunConfig.from_json(recorded)


def test_the_run_seed_seeds_every_training():
    cfg = RunConfig(seed=7)
    assert cfg.hpr.seed == cfg.lora.seed == cfg.reptune.seed == 7
    assert RunConfig.from_json(cfg.to_json()) == cfg
    recorded = RunConfig(seed=7).to_json()
    recorded["hpr"]["seed"] = 0  # written when training ignored --seed
    assert not same_settings(recorded, RunConfig(seed=7))


def test_runs_with_the_same_seed_train_the_same_hpr_and_other_seeds_another(tiny_toy, tmp_path):
    from safetensors.torch import load_file

    def weights(seed, name):
        out = tmp_path / name
        assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,hpr", "--seed", str(seed)]) == 0
        return load_file(out / "editors" / "hpr_all_layers" / "state.safetensors")

    first, again, other = weights(1, "a"), weights(1, "b"), weights(2, "c")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_the_released_sadi_grid_is_searched_on_validation(tiny_toy, tmp_path):
    import json

    from hpr.editors.sadi import RELEASED_GRIDS

    out = tmp_path / "run"
    assert main(["reproduce", "--out", str(out), "--quiet", "--methods", "base,sadi", "--sadi-grid", "released"]) == 0
    sweep = json.loads((out / "sadi_sweep.json").read_text())
    ks, deltas = RELEASED_GRIDS["heads"]
    n_heads = 4  # the tiny toy: 2 layers x 2 heads caps k
    tried = {(row["k"], row["delta"]) for row in sweep["val"]}
    assert tried == {(min(k, n_heads), d) for k in ks for d in deltas}
    assert sweep["chosen"] in sweep["val"]
    with pytest.raises(ValueError, match="sadi.grid"):
        dataclasses.replace(RunConfig().sadi, grid="wide")


@pytest.mark.parametrize(
    "dtype, message", [("float8", "Unsupported dtype 'float8'"), ("float16", "float16 needs a GPU")]
)
def test_reproduce_refuses_a_bad_dtype_before_any_work(dtype, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        reproduce(RunConfig(dtype=dtype), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_cli_passes_dtype_on(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_reproduce(cfg, out, device=None, progress=True, pass_threads=None, workers=None):
        seen.append(cfg)
        raise ValueError("stop here")

    monkeypatch.setattr("hpr.runs.reproduce", fake_reproduce)
    assert main(["reproduce", "--out", str(tmp_path), "--quiet"]) == 2
    assert main(["reproduce", "--out", str(tmp_path), "--quiet", "--dtype", "bfloat16"]) == 2
    assert [cfg.dtype for cfg in seen] == ["float32", "bfloat16"]
    monkeypatch.undo()
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--quiet", "--dtype", "fp16", "--device", "cpu"]) == 2
    assert "float16 needs a GPU" in capsys.readouterr().err


def test_a_run_config_is_hashable_and_its_settings_read_only():
    cfg = RunConfig(seed=3)
    assert hash(cfg) == hash(RunConfig(seed=3)) and cfg == RunConfig(seed=3)
    with pytest.raises(TypeError):
        cfg.settings["iti"] = None  # type: ignore[index]
    changed = cfg.with_settings(iti=dataclasses.replace(cfg.iti, k=8))
    assert changed.iti.k == 8 and cfg.iti.k == 48 and changed.hpr == cfg.hpr


def test_settings_flags_refuse_field_types_they_cannot_parse():
    from dataclasses import dataclass, field

    from hpr.cli import _flag_options
    from hpr.editors import Method

    @dataclass(frozen=True)
    class Odd:
        fine: tuple[float, ...] = field(default=(1.0,), metadata={"help": "100% fine"})
        maybe: int | None = None

    method = Method(name="odd", summary="", labels=("odd",), colours={}, order=99, settings=Odd)
    fields = {f.name: f for f in dataclasses.fields(Odd)}
    options = _flag_options("odd", fields["fine"], method)
    assert options["nargs"] == "+" and options["type"] is float and "100%% fine" in options["help"]
    with pytest.raises(TypeError, match="Odd.maybe: a setting must be str, int, float, bool"):
        _flag_options("odd", fields["maybe"], method)

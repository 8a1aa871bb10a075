"""RunConfig's model dtype: the ``--dtype`` option, its validation, and run folders written before it existed."""

import pytest

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


@pytest.mark.parametrize("dtype, message", [("float8", "Unsupported dtype 'float8'"),
                                            ("float16", "float16 needs a GPU")])
def test_reproduce_refuses_a_bad_dtype_before_any_work(dtype, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        reproduce(RunConfig(dtype=dtype), tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()


def test_cli_passes_dtype_on(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_reproduce(cfg, out, device=None, progress=True):
        seen.append(cfg)
        raise ValueError("stop here")

    monkeypatch.setattr("hpr.runs.reproduce", fake_reproduce)
    assert main(["reproduce", "--out", str(tmp_path), "--quiet"]) == 2
    assert main(["reproduce", "--out", str(tmp_path), "--quiet", "--dtype", "bfloat16"]) == 2
    assert [cfg.dtype for cfg in seen] == ["float32", "bfloat16"]
    monkeypatch.undo()
    assert main(["reproduce", "--out", str(tmp_path / "run"), "--quiet", "--dtype", "fp16", "--device", "cpu"]) == 2
    assert "float16 needs a GPU" in capsys.readouterr().err

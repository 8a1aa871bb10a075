"""Runs: the settings of a run (:mod:`hpr.runs.config`), the pipeline that fills a run folder
(:mod:`hpr.runs.pipeline`, started by :mod:`hpr.runs.command`, its steps spread over processes by
:mod:`hpr.runs.tasks` and :mod:`hpr.runs.parallel`) and the folder itself, read and written
(:mod:`hpr.runs.folder`)."""

from hpr.runs.command import reproduce
from hpr.runs.config import FEW_TEST_QUESTIONS, RunConfig, same_settings, settings_differences
from hpr.runs.folder import Run, dataset_fingerprint, editor_is_intact, read_json
from hpr.runs.pipeline import format_results

__all__ = [
    "FEW_TEST_QUESTIONS",
    "Run",
    "RunConfig",
    "dataset_fingerprint",
    "editor_is_intact",
    "format_results",
    "read_json",
    "reproduce",
    "same_settings",
    "settings_differences",
]

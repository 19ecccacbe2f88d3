"""Step runners, one per model family: the ONE place a family is registered.

The decoder engine picks its runner by the config parameter `family`; render.py takes the
graphs and extra config parameters it deploys from the same class.
"""
from .base import ModelLoadError, StepRunner
from .glm_asr import GlmAsrRunner
from .whisper import WhisperRunner

RUNNERS = {runner.family: runner for runner in (WhisperRunner, GlmAsrRunner)}
DEFAULT_FAMILY = WhisperRunner.family  # exports from before the `family` field are whisper


def runner_class(family: str) -> type:
    """The runner of `family`; an unknown or empty family is the default one (as before families)."""
    return RUNNERS.get(family or DEFAULT_FAMILY, RUNNERS[DEFAULT_FAMILY])


__all__ = ["DEFAULT_FAMILY", "RUNNERS", "ModelLoadError", "StepRunner", "runner_class"]

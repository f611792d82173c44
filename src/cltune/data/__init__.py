"""Dialogue data: loading and validation, speakers and their tokens, splits, EDA, demo corpus."""

from cltune.data.loading import Dataset, LoadReport, Utterance, load_dialogue
from cltune.data.speakers import assign_speaker_tokens, normalize_speaker
from cltune.data.split import Example, Split, TaskData, Turn, build_task, require_no_test

__all__ = [
    "Dataset",
    "Example",
    "LoadReport",
    "Split",
    "TaskData",
    "Turn",
    "Utterance",
    "assign_speaker_tokens",
    "build_task",
    "load_dialogue",
    "normalize_speaker",
    "require_no_test",
]

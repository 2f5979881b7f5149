"""Benchmark tasks: registry, prompt templates and data loading."""

from .data import DataError, Splits, load_splits
from .registry import TASKS, Task, get_task
from .templates import Example

__all__ = ["DataError", "Example", "Splits", "TASKS", "Task", "get_task", "load_splits"]

"""Tasks as data: where each task's records live and how they become examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import expand, templates
from .templates import Example


@dataclass(frozen=True)
class Task:
    """One benchmark task.

    Attributes:
        name: registry key.
        hub: ``datasets.load_dataset`` arguments (path, config name).
        local_dir: folder name under the local data directory.
        local_files: split name -> file name in ``local_dir`` (first match wins per split).
        fields: record fields the template reads (checked when the data is read).
        label_names: label values in candidate-index order (strings, ints or bools as they
            appear in the data; integer labels are also accepted as indices); None when the
            label is an index into a per-example candidate list (ReCoRD) or unused (generation).
        template: record, label index -> :class:`Example`.
        train_split / test_split: the splits training and testing draw from.
        n_train / n_dev / n_test: the protocol's sample sizes (MeZO: 1000 / 500 / 1000).
        train_as: ``classification`` (cross-entropy over candidates) or ``lm`` (LM loss on
            the gold candidate).
        metric: ``accuracy`` (candidate scoring) or ``f1`` (greedy generation; exact match too).
        expand: turns one record of a file into the records of its examples (nested formats).
    """

    name: str
    hub: tuple[str, str | None]
    local_dir: str
    local_files: dict[str, tuple[str, ...]]
    fields: tuple[str, ...]
    label_names: tuple
    template: Callable[[dict, int], Example]
    train_split: str = "train"
    test_split: str = "validation"
    n_train: int = 1000
    n_dev: int = 500
    n_test: int = 1000
    train_as: str = "classification"
    metric: str = "accuracy"
    expand: Callable[[dict], list[dict]] | None = None
    notes: str = field(default="", compare=False)


_SUPERGLUE_SPLITS = {
    "train": ("train.jsonl",),  # FewGLUE 32-shot files are another protocol: not used here
    "validation": ("validation.jsonl",),
}

TASKS: dict[str, Task] = {
    "sst2": Task(
        "sst2", ("glue", "sst2"), "sst2", {"train": ("train.tsv",), "validation": ("validation.tsv",)},
        ("sentence",), (0, 1), templates.sst2,
    ),
    "rte": Task(
        "rte", ("super_glue", "rte"), "rte", _SUPERGLUE_SPLITS, ("premise", "hypothesis"),
        ("entailment", "not_entailment"), templates.rte,
    ),
    "cb": Task(
        "cb", ("super_glue", "cb"), "cb", _SUPERGLUE_SPLITS, ("premise", "hypothesis"),
        ("entailment", "contradiction", "neutral"), templates.cb, n_dev=100,
    ),
    "boolq": Task(
        "boolq", ("super_glue", "boolq"), "boolq", _SUPERGLUE_SPLITS, ("question", "passage"),
        (False, True), templates.boolq,
    ),
    "wsc": Task(
        "wsc", ("super_glue", "wsc.fixed"), "wsc", _SUPERGLUE_SPLITS, ("text",), (False, True), templates.wsc,
    ),
    "wic": Task(
        "wic", ("super_glue", "wic"), "wic", _SUPERGLUE_SPLITS, ("word", "sentence1", "sentence2"),
        (False, True), templates.wic,
    ),
    "copa": Task(
        "copa", ("super_glue", "copa"), "copa", _SUPERGLUE_SPLITS, ("premise", "choice1", "choice2", "question"),
        (0, 1), templates.copa, n_dev=100, train_as="lm",
    ),
    "multirc": Task(
        "multirc", ("super_glue", "multirc"), "multirc", _SUPERGLUE_SPLITS, ("paragraph", "question", "answer"),
        (0, 1), templates.multirc, expand=expand.multirc,
    ),
    "record": Task(
        # Locally only the FewGLUE 32-example files exist; they are used (and reported) as a fallback.
        "record", ("super_glue", "record"), "record",
        {"train": ("train.jsonl", "fewglue_train32.jsonl"), "validation": ("validation.jsonl", "fewglue_dev32.jsonl")},
        ("passage", "query", "entities", "answers"), None, templates.record, train_as="lm",
        expand=expand.record_task,
    ),
    "winogrande": Task(
        "winogrande", ("winogrande", "winogrande_xl"), "winogrande", _SUPERGLUE_SPLITS,
        ("sentence", "option1", "option2"), ("1", "2"), templates.winogrande, train_as="lm",
    ),
    "squad": Task(
        "squad", ("squad", None), "squad", _SUPERGLUE_SPLITS, ("title", "context", "question", "answers"), None,
        templates.squad, train_as="lm", metric="f1",
    ),
    "drop": Task(
        "drop", ("drop", None), "drop", _SUPERGLUE_SPLITS, ("passage", "question", "answers_spans"), None,
        templates.drop, train_as="lm", metric="f1",
    ),
}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}") from None

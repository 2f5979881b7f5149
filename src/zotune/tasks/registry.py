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
        mlm_template: the prompt for masked LMs (LM-BFF); None: the task is for causal LMs only.
        label_field: the record field holding the label.
        parse_text: reads one line of a ``.txt`` task file into a record (TREC's format).
        drop_labels: label values of records that have no gold label and are skipped (SNLI's -1).
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
    mlm_template: Callable[[dict, int], Example] | None = None
    label_field: str = "label"
    parse_text: Callable[[str], dict] | None = None
    drop_labels: tuple = ()
    notes: str = field(default="", compare=False)


def parse_trec_line(line: str) -> dict:
    """``COARSE:fine question text`` (the TREC files) -> the hub's fields."""
    label, _, text = line.partition(" ")
    coarse, _, fine = label.partition(":")
    if not fine or not text:
        raise ValueError("expected 'COARSE:fine question'")
    return {"coarse_label": coarse, "fine_label": fine, "text": text}


_SUPERGLUE_SPLITS = {
    "train": ("train.jsonl",),  # FewGLUE 32-shot files are another protocol: not used here
    "validation": ("validation.jsonl",),
}

TASKS: dict[str, Task] = {
    "sst2": Task(
        "sst2", ("glue", "sst2"), "sst2", {"train": ("train.tsv",), "validation": ("validation.tsv",)},
        ("sentence",), (0, 1), templates.sst2, mlm_template=templates.sst2_mlm,
    ),
    "rte": Task(
        "rte", ("super_glue", "rte"), "rte", _SUPERGLUE_SPLITS, ("premise", "hypothesis"),
        ("entailment", "not_entailment"), templates.rte, mlm_template=templates.rte_mlm,
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
    # Masked-LM tasks of the LM-BFF k-shot protocol (with SST-2 and RTE above).
    "sst5": Task(
        "sst5", ("SetFit/sst5", None), "sst5", {"train": ("train.jsonl",), "test": ("test.jsonl",)}, ("text",),
        (0, 1, 2, 3, 4), None, test_split="test", mlm_template=templates.sst5_mlm,
    ),
    "snli": Task(
        "snli", ("snli", None), "snli", {"train": ("train.jsonl",), "test": ("test.jsonl",)},
        ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), None, test_split="test",
        mlm_template=templates.nli3_mlm, drop_labels=(-1,),
    ),
    "mnli": Task(
        "mnli", ("glue", "mnli"), "mnli",
        {"train": ("train.jsonl",), "validation_matched": ("validation_matched.jsonl",)},
        ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), None,
        test_split="validation_matched", mlm_template=templates.nli3_mlm,
    ),
    "trec": Task(
        "trec", ("trec", None), "trec", {"train": ("train.txt", "train.jsonl"), "test": ("test.txt", "test.jsonl")},
        ("text",), ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"), None, test_split="test",
        mlm_template=templates.trec_mlm, label_field="coarse_label", parse_text=parse_trec_line,
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

"""Reading task records (local files or the hub) and sampling the protocol's splits.

Local files use the field names of the hub datasets, so one parser serves both. The local
data directory is, in order: the ``data_dir`` argument, ``$ZOTUNE_DATA``, then
``../shared/data`` and ``./data`` relative to the working directory when they hold the
task's folder. Without one, records come from ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .registry import Task
from .templates import Example

_DEFAULT_DIRS = ("../shared/data", "data")


class DataError(ValueError):
    """A data file is malformed; the message names the file, line and field."""


@dataclass
class Splits:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    source: str  # where the records came from
    notes: list[str] = field(default_factory=list)  # protocol deviations to report with results


def find_data_dir(task: Task, data_dir: str | None = None) -> Path | None:
    if data_dir:
        path = Path(data_dir)
        if not (path / task.local_dir).is_dir():
            raise FileNotFoundError(f"no folder {task.local_dir!r} for task {task.name!r} in data dir {path}")
        return path
    candidates = [os.environ["ZOTUNE_DATA"]] if os.environ.get("ZOTUNE_DATA") else list(_DEFAULT_DIRS)
    for candidate in candidates:
        if (Path(candidate) / task.local_dir).is_dir():
            return Path(candidate)
    return None


def read_records(path: Path, parse_text=None) -> list[dict]:
    """Records of a ``.jsonl`` or ``.tsv`` file (TSV: header row, tab separated, no quoting), or of a
    ``.txt`` file with one record per line read by ``parse_text`` (TREC)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            record["_line"] = number
            records.append(record)
        return records
    if path.suffix == ".tsv":
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        records = []
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{number}: {len(row)} columns, the header has {len(header)}")
            record = dict(zip(header, row))
            record["_line"] = number
            records.append(record)
        return records
    if path.suffix == ".txt" and parse_text is not None:
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = parse_text(line.strip())
            except ValueError as err:
                raise DataError(f"{path}:{number}: {err}") from None
            record["_line"] = number
            records.append(record)
        return records
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl or .tsv)")


def label_index(task: Task, value, where: str) -> int:
    if task.label_names is None:  # an index into the example's own candidates (checked by to_examples)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if task.metric != "accuracy":
            return 0  # generation: the gold answers are fields, not a label
        raise DataError(f"{where}: no gold answer among the candidates (label {value!r})")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)  # TSV cells are strings
    for index, name in enumerate(task.label_names):
        if value == name and type(value) is type(name):
            return index
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(task.label_names):
        return value
    raise DataError(f"{where}: field {task.label_field!r} has value {value!r}; valid: {list(task.label_names)}")


def template_of(task: Task, masked: bool):
    template = task.mlm_template if masked else task.template
    if template is None:
        kind = "masked" if masked else "causal"
        raise ValueError(f"task {task.name!r} has no prompt for {kind} LMs")
    return template


def usable(task: Task, records: list[dict]) -> list[dict]:
    """Records with a gold label (SNLI marks some with -1)."""
    if not task.drop_labels:
        return records
    return [r for r in records if r.get(task.label_field) not in task.drop_labels]


def check_records(task: Task, records: list[dict], origin: str) -> None:
    """Every record has the fields the task reads and a valid label, sampled or not (one cheap pass).

    A field that no record has is a header problem, reported at line 1 for a TSV file.
    """
    needs_label = task.metric == "accuracy"
    needed = (*task.fields, *((task.label_field,) if needs_label else ()))
    if records:
        missing = [name for name in needed if all(name not in record for record in records)]
        if missing:
            first = records[0]
            columns = [key for key in first if not key.startswith("_")]
            if origin.endswith(".tsv"):
                raise DataError(f"{origin}:1: the header has no field {missing[0]!r} (task {task.name} needs "
                                f"{list(needed)}; found {columns})")
            raise DataError(f"{origin}:{first.get('_line', 1)}: missing field {missing[0]!r}, in every record "
                            f"(task {task.name} needs {list(needed)}; found {columns})")
    for position, record in enumerate(records):
        where = f"{origin}:{record.get('_line', position + 1)}"
        for name in needed:
            if name not in record or record[name] is None:
                raise DataError(f"{where}: missing field {name!r} (task {task.name} needs {list(task.fields)})")
        if needs_label:
            label_index(task, record.get(task.label_field), where)


def to_examples(task: Task, records: list[dict], origin: str, masked: bool = False) -> list[Example]:
    """Records (checked by :func:`check_records`) through the task's prompt template."""
    examples = []
    template = template_of(task, masked)
    for position, record in enumerate(records):  # (fields and labels: check_records, over the whole file)
        where = f"{origin}:{record.get('_line', position + 1)}"
        try:
            example = template(record, label_index(task, record.get(task.label_field), where))
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            raise DataError(f"{where}: malformed record for task {task.name} ({type(err).__name__}: {err})") from None
        if not 0 <= example.label < len(example.candidates):
            raise DataError(f"{where}: label {example.label} is not one of the {len(example.candidates)} candidates")
        examples.append(example)
    return examples


def expand_records(task: Task, records: list[dict], origin: str) -> list[dict]:
    """One record per example (MultiRC and ReCoRD files nest them)."""
    if task.expand is None:
        return records
    out = []
    for position, record in enumerate(records):
        try:
            out.extend(task.expand(record))
        except (KeyError, TypeError, AttributeError) as err:
            where = f"{origin}:{record.get('_line', position + 1)}"
            raise DataError(f"{where}: malformed record for task {task.name} ({type(err).__name__}: {err})") from None
    return out


def _local_split(task: Task, root: Path, split: str) -> tuple[list[dict], str] | None:
    for name in task.local_files.get(split, ()):
        path = root / task.local_dir / name
        if path.exists():
            return read_records(path, task.parse_text), str(path)
    return None


def _hub_split(task: Task, split: str) -> tuple[list[dict], str]:
    path, name = task.hub
    try:
        import datasets  # (a requirement, but an environment built for local files may lack it)

        dataset = datasets.load_dataset(path, name, split=split)
    except Exception as err:  # offline, unknown split, no datasets...: say where we looked and what failed
        where = ", ".join(_DEFAULT_DIRS if not os.environ.get("ZOTUNE_DATA") else [os.environ["ZOTUNE_DATA"]])
        raise FileNotFoundError(
            f"task {task.name!r}: no local folder {task.local_dir!r} (looked in {where}; set --data.data_dir or "
            f"$ZOTUNE_DATA) and datasets.load_dataset({path!r}, {name!r}, split={split!r}) failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        ) from None
    return [dict(r) for r in dataset], f"hub:{path}/{name}[{split}]"


def _records(task: Task, data_dir: str | None, rng, seed: int, notes: list[str]):
    """(train rows, their origin, test rows, their origin, source) of the task, expanded into one record
    per example; a task with no training file is split from its validation file (noted in ``notes``)."""
    root = find_data_dir(task, data_dir)
    if root is not None:
        test_records = _local_split(task, root, task.test_split)
        if test_records is None:
            raise FileNotFoundError(f"no {task.test_split} file for task {task.name!r} in {root / task.local_dir}")
        train_records = _local_split(task, root, task.train_split)
        source = str(root / task.local_dir)
    else:
        test_records = _hub_split(task, task.test_split)
        train_records = _hub_split(task, task.train_split)
        source = f"hub:{task.hub[0]}/{task.hub[1]}"

    test_rows, test_origin = test_records
    for _, origin in (test_records, train_records or (None, "")):
        if Path(origin).name.startswith("fewglue"):
            notes.append(f"{task.name}: only the FewGLUE 32-example file {origin} exists locally; it is used")
    if train_records is None:
        # Split the file's records (passages, for nested formats: no passage on both sides),
        # then expand them into examples.
        order = rng.permutation(len(test_rows))
        half = len(order) // 2
        train_rows = expand_records(task, [test_rows[i] for i in order[half:]], test_origin)
        test_rows = expand_records(task, [test_rows[i] for i in order[:half]], test_origin)
        train_origin = test_origin
        notes.append(
            f"{task.name}: no training file; train/dev and test were split deterministically "
            f"(seed {seed}) from {test_origin}: {len(train_rows)} / {len(test_rows)} examples"
        )
    else:
        train_rows, train_origin = train_records
        train_rows = usable(task, expand_records(task, train_rows, train_origin))
        test_rows = usable(task, expand_records(task, test_rows, test_origin))
    return train_rows, train_origin, test_rows, test_origin, source


def load_splits(
    task: Task,
    data_dir: str | None = None,
    n_train: int | None = None,
    n_dev: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    masked: bool = False,
    k_shot: int | None = None,
) -> Splits:
    """Sample train / dev (disjoint, both from the training split) and test (from the test split).

    Sizes default to the task's protocol values and are capped by what exists. A task with no
    local training file is split deterministically from its validation file (half to test),
    and the returned notes say so. ``masked`` uses the task's masked-LM prompt. ``k_shot`` is the
    LM-BFF protocol: k training and k dev examples per class from the training split (data seeds
    13, 21, 42, 87, 100 in the papers), and the whole test split unless ``n_test`` is given.
    """
    template_of(task, masked)  # fail early for a task without a prompt for this kind of model
    n_train = task.n_train if n_train is None else n_train
    n_dev = task.n_dev if n_dev is None else n_dev
    n_test = (task.n_test if k_shot is None else 10**9) if n_test is None else n_test
    rng = np.random.default_rng(seed)  # a local generator: the global numpy RNG is not touched
    notes: list[str] = []
    train_rows, train_origin, test_rows, test_origin, source = _records(task, data_dir, rng, seed, notes)
    check_records(task, train_rows, train_origin)
    check_records(task, test_rows, test_origin)
    if len(test_rows) > n_test:
        test_rows = [test_rows[i] for i in sorted(rng.choice(len(test_rows), n_test, replace=False))]
    if k_shot is not None:
        train_rows_sampled, dev_rows = _per_class(task, train_rows, k_shot, rng, train_origin)
        notes.append(f"{task.name}: {k_shot}-shot, data seed {seed}: {len(train_rows_sampled)} train / "
                     f"{len(dev_rows)} dev examples")
        n_train = n_dev = 0  # nothing more to report about the sizes
    else:
        order = rng.permutation(len(train_rows))
        train_rows_sampled = [train_rows[i] for i in order[:n_train]]
        dev_rows = [train_rows[i] for i in order[n_train : n_train + n_dev]]
    if len(train_rows_sampled) < n_train or len(dev_rows) < n_dev:
        empty_dev = "" if dev_rows or not n_dev else (
            "; no dev examples are left, so there is no dev evaluation and the final weights are tested "
            "(lower data.n_train to hold some out)")
        notes.append(f"{task.name}: asked for {n_train} train / {n_dev} dev, only {len(train_rows)} training "
                     f"records exist{empty_dev}")
    return Splits(
        train=to_examples(task, train_rows_sampled, train_origin, masked),
        dev=to_examples(task, dev_rows, train_origin, masked),
        test=to_examples(task, test_rows, test_origin, masked),
        source=source,
        notes=notes,
    )


def _per_class(task: Task, rows: list[dict], k: int, rng, origin: str) -> tuple[list[dict], list[dict]]:
    """k training and k dev records per class, disjoint, in a shuffled order."""
    if k < 1:
        raise ValueError(f"k_shot must be >= 1, got {k}")
    by_class: dict[int, list[dict]] = {}
    for position, row in enumerate(rows):
        where = f"{origin}:{row.get('_line', position + 1)}"
        by_class.setdefault(label_index(task, row.get(task.label_field), where), []).append(row)
    train, dev = [], []
    for label in sorted(by_class):
        members = by_class[label]
        if len(members) < 2 * k:
            raise DataError(f"{origin}: class {label} has {len(members)} examples, fewer than 2k = {2 * k}")
        order = rng.permutation(len(members))
        train += [members[i] for i in order[:k]]
        dev += [members[i] for i in order[k : 2 * k]]
    return [train[i] for i in rng.permutation(len(train))], [dev[i] for i in rng.permutation(len(dev))]

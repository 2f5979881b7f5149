"""Sampling protocol and clear errors on malformed data files."""

import sys

import pytest

from conftest import SHARED_DATA, needs_shared_data
from zotune.tasks import DataError, get_task, load_splits


@needs_shared_data
def test_protocol_sizes_are_deterministic_and_disjoint():
    task = get_task("sst2")
    a = load_splits(task, str(SHARED_DATA), seed=0)
    b = load_splits(task, str(SHARED_DATA), seed=0)
    c = load_splits(task, str(SHARED_DATA), seed=1)
    assert (len(a.train), len(a.dev), len(a.test)) == (1000, 500, 872)
    assert a.train == b.train and a.dev == b.dev and a.test == b.test
    assert a.train != c.train
    assert not {ex.prompt for ex in a.train} & {ex.prompt for ex in a.dev}
    assert a.notes == []


@needs_shared_data
def test_task_without_train_file_is_split_from_validation_and_says_so():
    splits = load_splits(get_task("boolq"), str(SHARED_DATA), seed=0)
    assert splits.notes and "split deterministically" in splits.notes[0]
    assert len(splits.test) == 1000 and len(splits.train) == 1000 and len(splits.dev) == 500
    assert not {ex.prompt for ex in splits.train} & {ex.prompt for ex in splits.test}


def write_task(root, name, files):
    folder = root / name
    folder.mkdir(parents=True)
    for filename, content in files.items():
        (folder / filename).write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(root)


GOOD_RTE = '{"premise": "p", "hypothesis": "h", "label": "entailment"}\n'


@pytest.mark.parametrize("content,message", [
    ('{"premise": "p", "label": "entailment"}\n', r"validation.jsonl:1: missing field 'hypothesis'"),
    (GOOD_RTE + '{"premise": "p", "hypothesis": "h", "label": "maybe"}\n',
     r"validation.jsonl:2: field 'label' has value 'maybe'"),
    ("", "the file is empty"),
    (b'{"premise": "\xff\xfe"}\n', "not UTF-8"),
    (GOOD_RTE + "{not json\n", r"validation.jsonl:2: invalid JSON"),
    ("[1, 2]\n", "expected a JSON object"),
])
def test_malformed_jsonl(tmp_path, content, message):
    root = write_task(tmp_path, "rte", {"train.jsonl": GOOD_RTE * 4, "validation.jsonl": content})
    with pytest.raises(DataError, match=message):
        load_splits(get_task("rte"), root, n_train=2, n_dev=1)


def test_malformed_tsv(tmp_path):
    root = write_task(tmp_path, "sst2", {"train.tsv": "sentence\tlabel\ngood\t1\nbad\t0\n",
                                         "validation.tsv": "sentence\tlabel\nfine\t1\nbroken line\n"})
    with pytest.raises(DataError, match=r"validation.tsv:3: 1 columns, the header has 2"):
        load_splits(get_task("sst2"), root)


def test_a_wrong_tsv_header_is_reported_at_line_1(tmp_path):
    # (it was reported at whichever line the sampler drew first, e.g. train.tsv:736)
    rows = "".join(f"s{i}\t{i % 2}\n" for i in range(50))
    root = write_task(tmp_path, "sst2", {"train.tsv": "text\tlabel\n" + rows,
                                         "validation.tsv": "sentence\tlabel\nfine\t1\n"})
    with pytest.raises(DataError, match=r"train.tsv:1: the header has no field 'sentence'.*found \['text', 'label'\]"):
        load_splits(get_task("sst2"), root, n_train=4, n_dev=2)


def test_a_bad_label_anywhere_is_an_error_even_unsampled(tmp_path):
    rows = ["good\t1", "bad\t0"] * 40 + ["odd\t7"]  # file line 82
    root = write_task(tmp_path, "sst2", {"train.tsv": "sentence\tlabel\n" + "\n".join(rows) + "\n",
                                         "validation.tsv": "sentence\tlabel\nfine\t1\n"})
    with pytest.raises(DataError, match=r"train.tsv:82: field 'label' has value 7"):
        load_splits(get_task("sst2"), root, n_train=4, n_dev=2)  # whatever the sample, the whole file is checked


def test_unknown_task_and_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'sst3'; valid: .*sst2"):
        get_task("sst3")
    with pytest.raises(FileNotFoundError, match="no folder 'rte'"):
        load_splits(get_task("rte"), str(tmp_path))


def test_no_local_files_and_no_hub_is_one_clear_error(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")  # (its absence: the test below)

    from zotune.tasks import get_task, load_splits

    def offline(*args, **kwargs):  # what datasets raises without a network
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.chdir(tmp_path)  # no ../shared/data or ./data from here
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError,
                       match=r"task 'sst2': no local folder 'sst2'.*--data.data_dir.*Couldn't reach"):
        load_splits(get_task("sst2"))


def test_no_local_files_and_no_datasets_package_is_one_clear_error(tmp_path, monkeypatch):
    from zotune.tasks import get_task, load_splits

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOTUNE_DATA", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ModuleNotFoundError
    with pytest.raises(FileNotFoundError, match=r"task 'rte': no local folder 'rte'.*ModuleNotFoundError"):
        load_splits(get_task("rte"))

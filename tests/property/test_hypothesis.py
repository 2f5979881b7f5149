"""Property-based tests: configurations and data records never fail with anything but a clear error."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zotune.config import ConfigError, RunConfig, apply_overrides, fields_of, flatten, to_dict
from zotune.tasks import TASKS, DataError
from zotune.tasks.data import read_records, to_examples

FIELDS = fields_of(RunConfig())
text = st.text(string.printable, max_size=12)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True), text,
                    st.lists(st.integers(0, 3), max_size=3))
# deadline=None throughout: these tests check behaviour, not time (Hypothesis's default 200 ms an example
# failed them on a loaded machine running 12 test workers)


@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), scalars, max_size=6))
@settings(max_examples=300, deadline=None)
def test_any_override_is_applied_or_rejected_with_a_config_error(overrides):
    try:
        config = apply_overrides(RunConfig(), overrides)
    except ConfigError:
        return
    # Whatever was accepted round-trips through the dict form unchanged.
    assert apply_overrides(RunConfig(), flatten(to_dict(config))) == config


@given(st.dictionaries(text.filter(lambda k: k not in FIELDS), scalars, min_size=1, max_size=3))
def test_unknown_keys_are_always_rejected(overrides):
    try:
        apply_overrides(RunConfig(), overrides)
    except ConfigError as err:
        assert "unknown config key" in str(err)
    else:
        raise AssertionError("an unknown key was accepted")


json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(text, inner, max_size=3)), max_leaves=8)
field_names = st.sampled_from(sorted({f for t in TASKS.values() for f in (*t.fields, t.label_field)}
                                     | {"label", "target", "idx"}))


@given(st.sampled_from(sorted(TASKS)), st.lists(st.dictionaries(field_names, json_values, max_size=8), min_size=1,
                                               max_size=4))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_record_becomes_an_example_or_a_data_error(task_name, records):
    task = TASKS[task_name]
    try:
        examples = to_examples(task, records, "fuzz.jsonl", masked=task.template is None)
    except DataError as err:
        assert str(err).startswith("fuzz.jsonl:")  # file and line first
        return
    for ex in examples:
        assert isinstance(ex.prompt, str) and 0 <= ex.label < len(ex.candidates)


@given(st.binary(max_size=300), st.sampled_from([".jsonl", ".tsv"]))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_bytes_are_read_or_rejected_with_a_data_error(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"file{suffix}"
    path.write_bytes(data)
    try:
        records = read_records(path)
    except DataError as err:
        assert str(path) in str(err)
        return
    assert all(isinstance(r, dict) for r in records)

"""Typed configs: YAML and dotted overrides, rejected early when wrong."""

import pytest

from zotune.cli import parse_config
from zotune.config import ConfigError, RunConfig, apply_overrides, load_yaml


def test_defaults_and_dotted_overrides():
    cfg = parse_config(["--optim.lr", "1e-4", "--train.steps=7", "--optim.two_sided", "false",
                        "--optim.betas", "[0.8, 0.9]", "--optim.method", "mezo_adam", "--data.n_train", "none"])
    assert cfg.optim.lr == 1e-4 and cfg.train.steps == 7 and cfg.optim.two_sided is False
    assert cfg.optim.options == {"betas": (0.8, 0.9)} and cfg.data.n_train is None
    assert RunConfig().optim.lr != 1e-4  # the defaults object is not mutated


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  method: mezo_adam\n  lr: 1.0e-5\ntrain:\n  steps: 3\n")
    cfg = parse_config(["--config", str(path), "--train.steps", "9"])
    assert (cfg.optim.method, cfg.optim.lr, cfg.train.steps) == ("mezo_adam", 1e-5, 9)


@pytest.mark.parametrize("overrides,message", [
    ({"optim.lrr": 1}, "unknown config key optim.lrr; did you mean optim.lr"),
    ({"train.steps": "1.5"}, "train.steps: expected an integer"),
    ({"optim.lr": "fast"}, "optim.lr: expected a number"),
    ({"optim.two_sided": "maybe"}, "expected true or false"),
    ({"optim.method": "mezo_adam", "optim.betas": "0.9"}, "expected a list"),
    ({"optim.method": "mezo_adam", "optim.betas": "[0.9]"}, "expected 2 values"),
    ({"optim.betas": "[0.9, 0.99]"}, "optim.betas is not an option of the chosen method; it belongs to mezo_adam"),
    ({"optim.method": "lozo", "optim.rank": "high"}, "optim.rank: expected an integer"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(RunConfig(), overrides)


def test_bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml: unknown config key"):
        load_yaml(path)
    with pytest.raises(FileNotFoundError):
        load_yaml(tmp_path / "missing.yaml")


def test_flag_syntax_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        parse_config(["--optim.lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_config(["lr=3"])


def test_method_options_follow_the_method():
    # The method decides which optim.<option> keys exist, whatever order they are given in; the record
    # (to_dict) writes them inline, as a YAML file does, and reads back to the same configuration.
    from zotune.config import from_dict, to_dict

    cfg = apply_overrides(RunConfig(), {"optim.rank": "auto", "optim.method": "tezo"})
    assert cfg.optim.options == {"rank": "auto"}
    cfg = apply_overrides(cfg, {"optim.rank": "8"})
    assert cfg.optim.options == {"rank": 8}
    assert to_dict(cfg)["optim"]["rank"] == 8 and "options" not in to_dict(cfg)["optim"]
    assert from_dict(to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="method 'mezo' takes no option optim.rank"):
        apply_overrides(cfg, {"optim.method": "mezo"})


def test_malformed_yaml_names_the_file_line_and_reason(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  method: [mezo\ntrain:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:4:6: not valid YAML: expected ',' or ']'"):
        load_yaml(path)


def test_a_section_that_is_not_a_mapping_is_named(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match=r"flat.yaml: section optim must be a mapping of its fields"):
        load_yaml(path)

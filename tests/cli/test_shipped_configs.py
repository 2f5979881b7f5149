"""Every shipped paper config parses, validates, names its source, and sits where its contents say."""

from pathlib import Path

import pytest

from zotune.config import apply_overrides, load_yaml
from zotune.train.validate import validate

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").rglob("*.yaml"))


def test_there_are_configs_for_every_method_family():
    families = {path.relative_to(path.parents[2]).parts[0] for path in CONFIGS}
    assert {"mezo", "lozo", "tezo", "adazeta", "loretta_adp", "loretta_rep"} <= families


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: "/".join(p.parts[-3:]))
def test_config_parses_and_validates(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("Source:" in line for line in header), "each config names its source"
    cfg = load_yaml(path)
    # task, method options, adapter and training fields, without loading a model; the device (a GPU, which
    # this machine may lack) is checked against the machine, so it is validated here as the CPU
    validate(apply_overrides(cfg, {"model.device": "cpu"}))
    method_dir, _model_dir, task_file = path.parts[-3:]
    assert cfg.data.task == task_file.removesuffix(".yaml")
    if method_dir.startswith("loretta_"):
        assert cfg.adapter.kind == method_dir.split("_")[1]
    else:
        assert cfg.optim.method == method_dir
    if method_dir in ("lozo", "tezo"):  # the papers' learning rates assume their raw scaling of Z
        assert cfg.optim.options["unit_variance"] is False

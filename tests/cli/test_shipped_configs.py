"""Every shipped paper config parses, validates, names its source, and sits where its contents say; --config
finds one by its name, and ``zotune configs`` lists them."""

import pytest

from zotune.cli import main
from zotune.config import SHIPPED_CONFIGS, apply_overrides, load_yaml, shipped_configs
from zotune.train.validate import validate

CONFIGS = sorted(SHIPPED_CONFIGS.rglob("*.yaml"))


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


def test_every_config_file_is_a_shipped_name():
    assert sorted(shipped_configs().values()) == CONFIGS


def test_a_config_is_found_by_its_name_and_a_file_of_that_name_comes_first(tmp_path, monkeypatch):
    shipped = load_yaml(SHIPPED_CONFIGS / "mezo" / "opt-13b" / "rte.yaml")
    for name in ("mezo/opt-13b/rte", "mezo/opt-13b/rte.yaml", "configs/mezo/opt-13b/rte.yaml"):
        assert load_yaml(name) == shipped, name
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mezo" / "opt-13b").mkdir(parents=True)
    (tmp_path / "mezo" / "opt-13b" / "rte.yaml").write_text("optim:\n  lr: 0.5\n")
    assert load_yaml("mezo/opt-13b/rte.yaml").optim.lr == 0.5  # the user's file, not the shipped one
    assert load_yaml("mezo/opt-13b/rte") == shipped  # no file of that name here


def test_an_unknown_config_name_is_one_error_with_the_closest_names():
    with pytest.raises(FileNotFoundError, match="did you mean mezo/opt-13b/rte"):
        load_yaml("mezo/opt-13b/rtee")
    assert main(["train", "--config", "mezo/opt-13b/rtee"]) == 2


def test_zotune_configs_lists_every_config_with_its_title(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(shipped_configs())
    assert "mezo/opt-13b/rte             MeZO, full-parameter, OPT-13B, rte." in lines

"""The run's set-up phase, the model-family table and the run's clean-up on errors."""

import pytest
import torch

import zotune
from conftest import SHARED_DATA, needs_shared_data, tiny_bert, tiny_gpt2, tiny_llama, tiny_opt
from zotune.config import ConfigError, RunConfig, apply_overrides
from zotune.train.setup import prepare_trainable, trainable_kind


@pytest.mark.parametrize("make,expected", [
    (tiny_llama, {"model.norm.weight"}),
    (tiny_opt, {"model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias"}),
    (tiny_gpt2, {"transformer.ln_f.weight", "transformer.ln_f.bias"}),
    (tiny_bert, {"cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}),
])
def test_the_default_trains_the_final_norm_of_every_family(make, expected):
    # The default trainable set (trainable=auto then) selected nothing on OPT, GPT-2 and BERT (a LLaMA-only
    # pattern) and the run stopped; it is now the family's final norm, and auto means full fine-tuning.
    model = make()
    count = prepare_trainable(model, RunConfig())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert count == sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert trainable_kind(model, RunConfig()) == "norms"
    auto = apply_overrides(RunConfig(), {"optim.trainable": "auto"})
    assert prepare_trainable(model, auto) == sum(p.numel() for p in model.parameters())  # full fine-tuning
    assert trainable_kind(model, auto) == "all"


def test_an_unknown_family_names_a_working_choice():
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(ConfigError, match="model type 'mystery'.*--optim.trainable all"):
        prepare_trainable(model, RunConfig())
    cfg = apply_overrides(RunConfig(), {"optim.trainable": "all"})
    assert prepare_trainable(model, cfg) == sum(p.numel() for p in model.parameters())
    assert trainable_kind(model, cfg) == "all"
    with pytest.raises(ConfigError, match="selects no parameter.*--optim.trainable all"):
        prepare_trainable(model, apply_overrides(RunConfig(), {"optim.trainable": "regex:^nothing$"}))


def test_the_default_lr_follows_the_trainable_kind():
    from zotune.train.setup import resolve_lr

    model = tiny_llama()
    prepare_trainable(model, RunConfig())
    assert resolve_lr(RunConfig(), model).optim.lr == zotune.METHODS["mezo"].default_lr["norms"]
    cfg = apply_overrides(RunConfig(), {"optim.trainable": "all", "optim.method": "lozo"})
    prepare_trainable(model, cfg)
    assert resolve_lr(cfg, model).optim.lr == zotune.METHODS["lozo"].default_lr["all"]
    given = apply_overrides(cfg, {"optim.lr": "0.5"})
    assert resolve_lr(given, model).optim.lr == 0.5


def test_lm_loss_serves_the_virtual_path_one_copy_at_a_time():
    # COPA-style tasks train on the LM loss of the gold answer; with copies_per_forward=1 the closure is
    # called as closure(copies=1), and gold_lm_loss returned a 0-d tensor where (1,) is required.
    from zotune.eval.scoring import Encoded
    from zotune.train.losses import LOSSES

    model = tiny_opt()
    for name, p in model.named_parameters():
        p.requires_grad_("embed_positions" not in name)
    batch = [Encoded((1, 5, 9, 3), ((7,), (11, 12)), 1), Encoded((2, 4), ((7, 8, 9), (10,)), 0)]
    loss = LOSSES["lm"]
    assert loss(model, batch, 0).shape == ()
    assert loss(model, batch, 0, copies=1).shape == (1,)
    losses = {}
    for per in (None, 1):
        model_copy = tiny_opt()
        model_copy.load_state_dict(model.state_dict())
        for name, p in model_copy.named_parameters():
            p.requires_grad_("embed_positions" not in name)
        opt = zotune.lozo([p for p in model_copy.parameters() if p.requires_grad], lr=1e-3, seed=1,
                          execution=zotune.Virtual(model_copy, copies_per_forward=per))
        opt.step(lambda copies=None, m=model_copy: loss(m, batch, 0, copies))
        losses[per] = torch.tensor(opt.last_record.losses)
    torch.testing.assert_close(losses[1], losses[None], rtol=1e-5, atol=1e-6)


@needs_shared_data
def test_logs_are_closed_when_a_run_fails(tiny_model_dir, tmp_path, monkeypatch):
    # The trajectory log and log.jsonl stayed open when a run stopped with an exception other than an
    # interruption; the run's phases now close them however the run ends.
    from zotune.train import loop

    runs = []
    init, step = loop.Training.__init__, loop.Training.step

    def recording_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        runs.append(self)

    def failing_step(self, index):
        if index == 2:
            raise RuntimeError("a failure in the middle of a run")
        return step(self, index)

    monkeypatch.setattr(loop.Training, "__init__", recording_init)
    monkeypatch.setattr(loop.Training, "step", failing_step)
    cfg = apply_overrides(RunConfig(), {
        "model.name": str(tiny_model_dir), "data.data_dir": str(SHARED_DATA), "data.n_train": "16",
        "data.n_dev": "0", "data.n_test": "4", "train.steps": "5", "train.batch_size": "4",
        "train.zero_shot": "false", "train.progress": "false", "train.output_dir": str(tmp_path),
        "train.run_name": "failed"})
    with pytest.raises(RuntimeError, match="in the middle"):
        loop.fit(cfg, say=lambda _: None)
    (run,) = runs
    assert run.run._log.closed and run.trajectory._file.closed
    assert (tmp_path / "failed" / "trajectory.bin").stat().st_size > 0  # the two steps before were recorded


@needs_shared_data
def test_a_plain_run_evaluates_dev_five_times_and_says_when_low_rank_has_no_matrix(tiny_model_dir, tmp_path):
    from zotune.train import loop

    said = []
    cfg = apply_overrides(RunConfig(), {
        "model.name": str(tiny_model_dir), "data.data_dir": str(SHARED_DATA), "data.n_train": "16",
        "data.n_dev": "4", "data.n_test": "4", "train.steps": "10", "train.batch_size": "4",
        "train.progress": "false", "train.output_dir": str(tmp_path), "train.run_name": "run",
        "optim.method": "lozo"})
    loop.fit(cfg, say=said.append)
    import json

    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "dev_accuracy" in r] == [2, 4, 6, 8, 10]
    assert any("lozo draws low-rank directions for matrices" in line for line in said)
    assert sum("zero-shot accuracy" in line for line in said) == 1
    assert yaml_of(tmp_path / "run" / "config.yaml")["optim"]["lr"] == zotune.METHODS["lozo"].default_lr["norms"]


def yaml_of(path):
    import yaml

    return yaml.safe_load(path.read_text())


def test_zero_shot_sees_the_model_without_its_adapters():
    # LoRETTA_adp adapters with the reference's init start as random maps; a zero-shot score measured with
    # them in place is not the base model's. adapters.disabled() bypasses them.
    from zotune import adapters

    model = tiny_llama()
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        adapters.inject(model, adapters.LorettaAdpConfig(bottleneck=8, tt_rank=2, function_preserving=False))
        adapted = model(input_ids=ids).logits
        with adapters.disabled(model):
            bypassed = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    assert torch.equal(bypassed, base) and torch.equal(again, adapted)


def test_the_divergence_guard_is_on_by_default_for_zo_runs():
    from zotune.train.setup import DEFAULT_GUARD_SPIKE, build_guard

    assert build_guard(RunConfig()).spike_factor == DEFAULT_GUARD_SPIKE
    assert build_guard(apply_overrides(RunConfig(), {"optim.method": "adamw"})) is None  # first-order: off
    assert build_guard(apply_overrides(RunConfig(), {"train.guard_spike": "0"})) is None  # the flag turns it off
    assert build_guard(apply_overrides(RunConfig(), {"train.guard_spike": "3"})).spike_factor == 3.0

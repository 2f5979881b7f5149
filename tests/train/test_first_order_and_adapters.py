"""Backprop baseline and tensor-train adapters through the same training loop as the ZO methods."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATA, lm_closure, needs_shared_data, tiny_llama
from zotune.cli import main
from zotune.optim.first_order import FirstOrder


def test_first_order_step_is_adamw_on_the_backprop_gradient(batch):
    model, reference = tiny_llama(), tiny_llama()
    opt = FirstOrder(model.parameters(), lr=1e-3, max_grad_norm=0.0)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(3):
        loss = opt.step(lm_closure(model, batch))
        ref_opt.zero_grad()
        ref_loss = lm_closure(reference, batch)()
        ref_loss.backward()
        ref_opt.step()
        assert loss == pytest.approx(ref_loss.item())
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert all(p.grad is None for p in model.parameters())  # gradients are freed between steps


def test_first_order_skips_non_finite_and_rejected_steps(batch):
    model = tiny_llama()
    before = [p.detach().clone() for p in model.parameters()]
    opt = FirstOrder(model.parameters(), lr=1e-2)
    opt.step(lambda: lm_closure(model, batch)() * float("nan"))
    opt.step(lm_closure(model, batch), accept=lambda record: False)
    assert opt.num_skipped == 2 and opt.num_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@needs_shared_data
@pytest.mark.parametrize("method,kind", [("adamw", "rep"), ("adazeta", "adp"), ("adamw", "none"), ("mezo", "lora"),
                                         ("adamw", "lora")])
def test_loop_trains_adapters_or_full_model(tiny_model_dir, tmp_path, method, kind, capsys):
    argv = ["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA), "--data.n_train", "16",
            "--data.n_dev", "0", "--data.n_test", "8", "--train.steps", "4", "--train.batch_size", "4",
            "--optim.method", method, "--optim.lr", "1e-3", "--adapter.kind", kind, "--adapter.tt_rank", "2",
            "--adapter.bottleneck", "8", "--adapter.r", "4", "--train.output_dir", str(tmp_path),
            "--train.run_name", "run", "--train.progress", "false", "--train.zero_shot", "false"]
    if kind == "none":
        argv += ["--optim.trainable", "all"]
    assert main(argv) == 0
    run = tmp_path / "run"
    names = set(load_file(str(run / "trainable.safetensors")))
    if kind == "none":
        assert "model.embed_tokens.weight" in names and not any("loretta_" in n for n in names)
    elif kind == "lora":  # PEFT LoRA on the query and value projections
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    elif kind == "rep":  # LoRETTA_rep trains the TT factors only by default
        assert names and all("loretta_" in n for n in names)
    else:  # LoRETTA_adp trains its adapters and every norm
        assert names and all("loretta_" in n or "norm" in n for n in names) and any("norm" in n for n in names)
    assert json.loads((run / "results.json").read_text())["steps"] == 4
    assert (run / "trajectory.bin").exists() == (method != "adamw")  # only ZO runs can be replayed
    if method == "adamw":  # and replay says so
        capsys.readouterr()
        assert main(["replay", str(tiny_model_dir), str(run)]) == 2
        assert "adamw, a first-order method, which keeps no trajectory" in capsys.readouterr().err


def test_adapter_config_errors(capsys):
    assert main(["train", "--adapter.kind", "prefix"]) == 2
    assert "adapter.kind: unknown kind 'prefix'" in capsys.readouterr().err
    assert main(["train", "--adapter.kind", "adp", "--adapter.tt_rank", "0"]) == 2
    assert "adapter: tt_rank must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--optim.method", "adamw", "--optim.virtual", "true"]) == 2
    assert "first-order" in capsys.readouterr().err

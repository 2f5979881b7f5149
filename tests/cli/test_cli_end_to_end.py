"""The CLI on a tiny local model folder: trains, evaluates, writes the run folder."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from conftest import SHARED_DATA, needs_shared_data
from zotune import METHODS
from zotune.cli import main


@needs_shared_data
@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_five_steps(tiny_model_dir, tmp_path, method, capsys):
    """Every registered method runs the default job's command (`--optim.method`), end to end."""
    code = main(["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA),
                 "--data.n_train", "32", "--data.n_dev", "8", "--data.n_test", "16", "--train.steps", "5",
                 "--train.batch_size", "4", "--train.eval_every", "5", "--optim.method", method,
                 "--optim.lr", "1e-4", "--train.output_dir", str(tmp_path), "--train.run_name", "run",
                 "--train.progress", "false", "--train.checkpoint_every", "5"])
    assert code == 0
    out = capsys.readouterr().out
    assert "zero-shot accuracy" in out and "fine-tuned accuracy" in out
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 5 and results["test_examples"] == 16 and 0 <= results["accuracy"] <= 1
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3, 4, 5]
    assert any("dev_accuracy" in s for s in steps)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["method"] == method
    assert load_file(str(run / "trainable.safetensors"))
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoints" / "step-000000005" / "manifest.json").exists()


@needs_shared_data
def test_virtual_training_measures_the_in_place_losses(tiny_model_dir, tmp_path):
    """The loop's closure serves the virtual path (closure(copies=S)), whole or one copy per forward.

    Same seeds, so the same directions. g = (L+ - L-) / 2ε with ε = 1e-3: float32 losses near 0.7
    that differ by a few 1e-7 (perturbed weights in place against perturbed outputs) move g by
    about 1e-4, hence atol 1e-3 against in place; split forwards compute the same rows.
    """
    grads, losses = {}, {}
    for name, extra in [("in_place", []), ("virtual", ["--optim.virtual", "true"]),
                        ("one_copy", ["--optim.virtual", "true", "--optim.copies_per_forward", "1"])]:
        assert main(["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA),
                     "--data.n_train", "16", "--data.n_dev", "4", "--data.n_test", "4", "--train.steps", "3",
                     "--train.batch_size", "2", "--train.eval_every", "0", "--optim.method", "lozo",
                     "--optim.num_queries", "2", "--optim.lr", "1e-3", "--optim.trainable", "regex:mlp",
                     "--train.output_dir", str(tmp_path), "--train.run_name", name,
                     "--train.progress", "false", *extra]) == 0
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        grads[name] = [g for s in log if "loss" in s for g in s["projected_grads"]]
        losses[name] = [s["loss"] for s in log if "loss" in s]
    assert len(grads["in_place"]) == 3 * 2 and max(map(abs, grads["in_place"])) > 1e-2
    assert grads["one_copy"] == pytest.approx(grads["virtual"], abs=1e-5)
    assert grads["virtual"] == pytest.approx(grads["in_place"], abs=1e-3)
    assert losses["one_copy"] == pytest.approx(losses["in_place"], rel=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["train", "--optim.method", "sgd0"], "unknown method 'sgd0'; valid: mezo, mezo_momentum"),
    (["train", "--data.task", "nope"], "unknown task 'nope'"),
    (["train", "--optim.lrr", "1"], "unknown config key"),
    (["frobnicate"], "unknown command"),
    (["train", "--model.name", "./no/such/model"], "no model folder"),
    (["eval", "--model.name", "smolm2-135m"], "a built-in alias (smollm2-135m, minilm-l6)"),
])
def test_errors_are_one_line_messages(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_lists_every_field(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--optim.lr", "--optim.method", "--train.steps", "--data.task", "--model.name"):
        assert key in out


def test_methods_and_tasks(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("mezo_adam", "tezo", "adamw"))
    assert main(["tasks"]) == 0 and "sst2" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_zotune_torch_and_transformers(flag, capsys):
    import torch
    import transformers

    import zotune

    assert main([flag]) == 0
    assert capsys.readouterr().out == (f"zotune {zotune.__version__} (torch {torch.__version__}, "
                                       f"transformers {transformers.__version__})\n")


@pytest.mark.parametrize("argv,status,text", [(["methods"], 0, "mezo_adam"), (["nonsense"], 2, "unknown command")])
def test_a_torchrun_rank_ends_with_mains_status_and_all_its_output(argv, status, text):
    """Under torchrun (WORLD_SIZE > 1) ``python -m zotune`` ends with ``os._exit``, past the interpreter's
    teardown: the status is still main's, and what went to a pipe (block-buffered) still arrives."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-m", "zotune", *argv], capture_output=True, text=True, timeout=300,
                          env={**env, "WORLD_SIZE": "2"})
    assert done.returncode == status, done.stderr
    assert text in (done.stdout if status == 0 else done.stderr)
    if status == 0:
        assert len(done.stdout.splitlines()) == len(METHODS)  # one line a method, none cut


def test_a_reader_that_leaves_early_gets_no_traceback():
    """`zotune methods | head -1`: the pipe's reader is gone (here before the command writes anything, as it
    imports torch first); the command ends with status 1 and no BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "zotune", "methods"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=300) == 1 and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("argv,message", [
    (["--optim.method", "mezo", "--optim.rank", "4"], "optim.rank is not an option of the chosen method"),
    (["--optim.method", "mezo", "--optim.virtual", "true"], "needs a method with factored directions"),
    (["--optim.method", "lozo", "--optim.virtual", "true", "--optim.drift_safe", "true"], "exclude each other"),
    (["--optim.method", "lozo", "--optim.copies_per_forward", "2"], "set optim.virtual or optim.batched true"),
    (["--optim.method", "lozo", "--optim.virtual", "true", "--optim.copies_per_forward", "0"], "positive integer"),
    (["--optim.method", "mezo_adam", "--train.guard_spike", "3", "--train.guard_action", "rollback"], "keeps moments"),
    (["--train.guard_spike", "3", "--train.guard_action", "reset"], "guard action"),
    (["--optim.eps", "0"], "optim.eps must be > 0, got 0.0"),
    (["--optim.lr", "-1"], "optim.lr must be >= 0, got -1.0"),
    (["--train.keep_checkpoints", "0"], "keep_checkpoints"),
    (["--train.sharding", "fsdp"], "launch with torchrun"),
    (["--train.sharding", "fsdp", "--optim.method", "lozo"], "launch with torchrun"),  # every ZO method shards
    (["--train.sharding", "fsdp", "--optim.method", "adamw"], "trains ZO methods, not 'adamw'"),
    (["--train.sharding", "fsdp", "--optim.generator", "torch"], "not 'mezo' with generator torch"),
    (["--train.checkpoint", "trajectory", "--optim.method", "adamw"], "'adamw' is first-order"),
])
def test_contradictions_fail_before_loading(argv, message, capsys, monkeypatch):
    import zotune.models.loading as loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the configuration was checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    assert main(["train", "--model.name", "./never/loaded", *argv]) == 2
    assert message in capsys.readouterr().err


@needs_shared_data
def test_eval_in_context_baseline(tiny_model_dir, capsys):
    argv = ["eval", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA), "--data.task", "rte",
            "--data.n_test", "6", "--train.progress", "false"]
    assert main(argv + ["--data.icl_demos", "2"]) == 0
    assert "in-context (2 demonstrations) accuracy on rte (6 test examples" in capsys.readouterr().out
    assert main(argv) == 0
    assert "zero-shot accuracy on rte (6 test examples" in capsys.readouterr().out
    assert main(["train", "--data.icl_demos", "2"]) == 2
    assert "in-context baseline" in capsys.readouterr().err


def test_eval_in_context_refuses_a_masked_lm(tmp_path, capsys):
    from transformers import BertConfig

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path)  # the kind is read from the config
    assert main(["eval", "--model.name", str(tmp_path), "--data.icl_demos", "2"]) == 2
    assert "is a masked LM, whose prompt holds one mask" in capsys.readouterr().err


@needs_shared_data
def test_report_to_tensorboard_and_wandb(tiny_model_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network: W&B writes its run file locally
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA),
                 "--data.n_train", "16", "--data.n_dev", "4", "--data.n_test", "4", "--train.steps", "3",
                 "--train.batch_size", "4", "--train.eval_every", "3", "--train.report_to", "tensorboard,wandb",
                 "--train.output_dir", str(tmp_path), "--train.run_name", "run", "--train.progress", "false",
                 "--train.zero_shot", "false"]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("dev_accuracy")] == [3]
    # The offline run file is W&B's binary record log; wandb ships no reader for it any more, so the
    # check is that the history records carrying the logged names are in it.
    (record,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"dev_accuracy" in data and data.count(b"loss") >= 3
    assert wandb.run is None  # finished with the run


def test_report_to_refuses_unknown_tools(capsys):
    assert main(["train", "--train.report_to", "tensorboard,mlflow"]) == 2
    assert "train.report_to: unknown 'mlflow'; choose from ['tensorboard', 'wandb']" in capsys.readouterr().err


@needs_shared_data
def test_keep_best_tests_the_best_dev_checkpoint(tiny_model_dir, tmp_path, capsys):
    assert main(["train", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA),
                 "--data.n_train", "16", "--data.n_dev", "8", "--data.n_test", "4", "--train.steps", "6",
                 "--train.batch_size", "4", "--train.eval_every", "2", "--optim.lr", "1e-2",
                 "--optim.trainable", "all", "--train.output_dir", str(tmp_path), "--train.run_name", "run",
                 "--train.progress", "false", "--train.zero_shot", "false"]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    devs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "dev_accuracy" in line]
    best = max(devs, key=lambda r: (r["dev_accuracy"], -r["step"]))  # the first of the best
    assert results["best_step"] == best["step"] and results["best_dev_accuracy"] == best["dev_accuracy"]
    assert f"testing the weights of step {best['step']}" in capsys.readouterr().out
    assert set(load_file(str(run / "best.safetensors"))) == set(load_file(str(run / "trainable.safetensors")))


@needs_shared_data
def test_bench_measures_three_phases(tiny_model_dir, tmp_path, capsys):
    assert main(["bench", "--model.name", str(tiny_model_dir), "--data.data_dir", str(SHARED_DATA),
                 "--optim.trainable", "all", "--train.batch_size", "2", "--train.output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for phase in ("| inference |", "| zo |", "| backprop |"):
        assert phase in out
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert all(row["seconds"] > 0 and row["peak_mib"] > 0 for row in results.values())
    assert main(["bench", "--optim.method", "adamw"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--model.device", "cuda"], "model.device=cuda, but this machine has no CUDA device"),
    (["--model.device", "tpu"], "unknown device 'tpu'"),
    (["--model.dtype", "float8"], "unknown dtype 'float8'"),
])
def test_devices_are_checked_before_loading(argv, message, capsys, monkeypatch):
    import torch

    import zotune.models.loading as loading

    if argv[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    for command in ("train", "eval"):
        assert main([command, "--model.name", "./never/loaded", *argv]) == 2
        assert message in capsys.readouterr().err


def test_an_unreachable_hub_is_reported_at_once(monkeypatch, capsys):
    # The hub client retried for about 27 s before failing; a closed port on this machine stands in
    # for the unreachable hub (no traffic leaves the machine).
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert main(["eval", "--model.name", "some-org/not-cached-model"]) == 2
    err = capsys.readouterr().err
    assert "the Hugging Face hub is unreachable" in err and "built-in alias" in err
    assert time.monotonic() - start < 15

"""`zotune export`: the fine-tuned model as a folder plain transformers loads, with the run's function."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import SHARED_DATA, needs_shared_data
from zotune.cli import main
from zotune.config import from_dict
from zotune.train.checkpoint import load_trainable
from zotune.train.export import ADAPTERS_FILE
from zotune.train.recipe import setup

pytestmark = needs_shared_data
IDS = torch.tensor([[5, 9, 3, 17, 2, 8], [1, 4, 4, 30, 6, 7]])


def train(model_dir, out, name, *extra):
    assert main(["train", "--model.name", str(model_dir), "--data.data_dir", str(SHARED_DATA), "--data.n_train", "16",
                 "--data.n_dev", "0", "--data.n_test", "4", "--train.steps", "4", "--train.batch_size", "4",
                 "--train.zero_shot", "false", "--train.progress", "false", "--train.output_dir", str(out),
                 "--train.run_name", name, *extra]) == 0
    return out / name


def fine_tuned_logits(run_dir):
    """The run's model as zotune holds it: base, adapters injected, trained weights loaded."""
    import yaml

    pieces = setup(from_dict(yaml.safe_load((run_dir / "config.yaml").read_text())), data=False, say=lambda _: None)
    load_trainable(pieces.model, run_dir / "trainable.safetensors")
    with torch.no_grad():
        return pieces.model(input_ids=IDS).logits


@pytest.mark.parametrize("setting,exact", [
    (("--optim.trainable", "all", "--optim.lr", "1e-2"), True),
    (("--adapter.kind", "lora", "--adapter.r", "4", "--optim.lr", "1e-1", "--optim.eps", "1e-2"), False),
    (("--adapter.kind", "rep", "--adapter.tt_rank", "2", "--optim.lr", "1e-1"), False),
], ids=["full", "lora", "rep"])
def test_the_exported_model_computes_the_fine_tuned_function(tiny_model_dir, tmp_path, setting, exact):
    run_dir = train(tiny_model_dir, tmp_path, "run", *setting)
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers, no zotune layers
    assert not any("lora" in n or "loretta" in n for n, _ in exported.named_parameters())
    with torch.no_grad():
        logits = exported(input_ids=IDS).logits
    reference = fine_tuned_logits(run_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=IDS).logits, reference)  # the run changed the function
    if exact:  # the trained weights written in: the same tensors
        assert torch.equal(logits, reference)
    else:  # merged in float32: a sum in another order
        torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_adp_adapters_are_exported_beside_the_model(tiny_model_dir, tmp_path, capsys):
    from zotune import adapters

    run_dir = train(tiny_model_dir, tmp_path, "run", "--adapter.kind", "adp", "--adapter.bottleneck", "8",
                    "--adapter.tt_rank", "2", "--optim.lr", "1e-1")
    assert main(["export", str(run_dir), str(tmp_path / "out")]) == 0
    assert "cannot be merged" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    adapters.load(model, tmp_path / "out" / ADAPTERS_FILE)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, fine_tuned_logits(run_dir), rtol=0, atol=0)


def test_export_from_the_trajectory_equals_export_from_the_weights(tiny_model_dir, tmp_path):
    run_dir = train(tiny_model_dir, tmp_path, "run", "--optim.trainable", "all", "--optim.lr", "1e-2")
    assert main(["export", str(run_dir), str(tmp_path / "a")]) == 0
    assert main(["export", str(run_dir), str(tmp_path / "b"), "--trajectory"]) == 0
    a, b = (AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict() for name in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert main(["export", str(run_dir), str(tmp_path / "a")]) == 2  # an existing export is not overwritten

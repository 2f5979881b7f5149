"""zotune.ZOTrainer through a real transformers Trainer run on a tiny LLaMA: it learns, resumes
bit-identically, accumulates micro-batches into one ZO step, runs the virtual path and PEFT models."""

import pytest
import torch
from transformers import TrainingArguments

import zotune
from conftest import tiny_llama


def pattern_data(n, seed):
    """Sequences of an arithmetic pattern (start + 3k): a tiny LM can learn them."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, 8, (1,), generator=g))
        ids = torch.tensor([(start + 3 * k) % 60 + 2 for k in range(12)])
        rows.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": ids})
    return rows


def trainer_for(model, out, steps=40, lr=3e-3, ga=1, batch=8, trainer_class=None, **kw):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             lr_scheduler_type="linear", warmup_steps=2, gradient_accumulation_steps=ga,
                             save_steps=steps // 2, logging_steps=10, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True)
    return (trainer_class or zotune.ZOTrainer)(model=model, args=args, train_dataset=pattern_data(64, 0),
                                              eval_dataset=pattern_data(16, 1), **kw)


def test_the_loss_falls_and_a_resume_equals_the_uninterrupted_run(tmp_path):
    model = tiny_llama()
    trainer = trainer_for(model, tmp_path / "a", method="mezo")
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    # Measured with this seed: 4.204 -> 4.06 at lr 3e-3 (constant schedule); a linear decay learns a little less.
    assert trainer.evaluate()["eval_loss"] < before - 0.05
    assert trainer.zo_optimizer.num_steps == 40
    resumed_model = tiny_llama(seed=7)  # other weights: all must come from the checkpoint
    resumed = trainer_for(resumed_model, tmp_path / "b", method="mezo")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-20"))
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert torch.equal(a, b), name


def test_the_logs_show_the_projected_gradient_not_a_gradient_norm(tmp_path):
    # No gradient exists, so the Trainer's grad_norm would read 0 at every log; the log holds the mean |g| of
    # the steps since the previous log instead (logging_steps=10: steps 1-10, then 11-20).
    trainer = trainer_for(tiny_llama(), tmp_path, steps=20, method="mezo")
    seen = []
    step = zotune.ZOTrainer.training_step

    def recording_step(self, *args, **kwargs):
        loss = step(self, *args, **kwargs)
        seen.append(abs(self.zo_optimizer.last_record.projected_grads[0]))
        return loss

    trainer.training_step = recording_step.__get__(trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and not any("grad_norm" in entry for entry in logs)
    assert [entry["projected_grad"] for entry in logs] == pytest.approx([sum(seen[:10]) / 10, sum(seen[10:]) / 10])
    assert all(entry["projected_grad"] > 0 for entry in logs)


def test_micro_batches_make_one_step_with_the_same_directions(tmp_path):
    # Two micro-batches of 8 are one ZO step measured with the same directions: the mean of their losses
    # (equal token counts) is the loss of the 16 examples in one batch, so the projected gradient agrees
    # with one batch of 16 to float32 rounding (~1e-7 relative, over 2ε = 2e-3 in g: within 1e-3).
    grads = {}
    for batch, ga in ((16, 1), (8, 2)):
        trainer = trainer_for(tiny_llama(), tmp_path / str(ga), steps=1, ga=ga, batch=batch, method="mezo")
        trainer.train()
        assert trainer.zo_optimizer.num_steps == 1 and trainer.state.global_step == 1
        grads[ga] = trainer.zo_optimizer.last_record.projected_grads
    assert grads[1] == pytest.approx(grads[2], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("method,execution", [("lozo", "virtual"), ("tezo", "drift_safe")])
def test_other_methods_and_paths_train(tmp_path, method, execution):
    model = tiny_llama()
    for name, p in model.named_parameters():  # the virtual path leaves RMSNorm scales to be frozen
        p.requires_grad_("norm" not in name)
    trainer = trainer_for(model, tmp_path, steps=20, method=method, execution=execution,
                          method_options={"rank": 2})
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


@pytest.mark.parametrize("execution", [None, "batched"])
def test_a_peft_lora_model_trains_its_adapters_only(tmp_path, execution):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = trainer_for(model, tmp_path, steps=10, lr=1e-2, method="mezo", execution=execution)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] != before  # the adapters moved
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)
    assert trainer.zo_optimizer.num_steps == 10


def test_first_order_methods_are_refused():
    with pytest.raises(ValueError, match="first-order"):
        zotune.ZOTrainer(model=tiny_llama(), args=TrainingArguments(output_dir="unused", use_cpu=True, report_to=[]),
                         method="adamw")


def test_a_compute_loss_that_pops_the_labels_is_measured_at_every_point(tmp_path):
    # A step measures the loss at +εZ and −εZ on the same inputs; a compute_loss that pops "labels" (as the
    # Trainer's own does with a label smoother) must get them at both points.
    class Popping(zotune.ZOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            return model(**inputs, labels=labels).loss

    trainer = trainer_for(tiny_llama(), tmp_path, steps=2, method="mezo", trainer_class=Popping)
    trainer.train()
    assert trainer.zo_optimizer.num_steps == 2 and len(trainer.zo_optimizer.last_record.losses) == 2


def test_the_virtual_path_measures_what_compute_loss_measures_on_padded_batches(tmp_path):
    # Left-padded rows and GPT-2's learned positions, all trained: the copies closure passes the model the
    # inputs compute_loss gets, repeated (the position ids the model derives itself reach the position
    # embedding per row while measuring), so its losses are the in-place path's, point for point.
    from conftest import tiny_gpt2

    rows = []
    for row in pattern_data(16, 2):
        pad = len(rows) % 4  # 0-3 pad tokens on the left
        mask = (torch.arange(12) >= pad).long()
        rows.append({"input_ids": row["input_ids"] * mask, "attention_mask": mask,
                     "labels": row["labels"].masked_fill(mask == 0, -100)})
    grads = {}
    for execution in ("in_place", "virtual"):
        trainer = trainer_for(tiny_gpt2(), tmp_path / execution, steps=2, method="lozo", execution=execution,
                              method_options={"rank": 2})
        trainer.train_dataset = rows
        trainer.train()
        grads[execution] = trainer.zo_optimizer.last_record.projected_grads
    # float32 losses of ~4 measured in one forward over the copies against one each: rounding ~1e-6 over 2ε
    assert grads["virtual"] == pytest.approx(grads["in_place"], rel=1e-3, abs=1e-3)

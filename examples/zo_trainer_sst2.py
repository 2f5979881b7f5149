"""Fine-tune SmolLM2-135M on SST-2 with a transformers Trainer script, ZOTrainer in place of Trainer.

    python examples/zo_trainer_sst2.py                  # the CLI's task files (../shared/data or $ZOTUNE_DATA)
    python examples/zo_trainer_sst2.py --steps 300

The script is an ordinary Trainer script: a tokenised dataset, a data collator, TrainingArguments,
and a ``compute_loss`` override for the task's loss (the cross-entropy over the two answers'
log-likelihoods at the end of the prompt, MeZO's "train as classification"). Only the trainer
class and its method are zotune's.
It trains the final norm (576 parameters, as the CLI's built-in demo does, so that it runs in a few
minutes on a CPU) and prints the test accuracy on SST-2's 872 validation sentences before and after,
scored as the CLI scores them (the mean log-likelihood of " terrible" against " great").
"""

from __future__ import annotations

import argparse

import torch
from transformers import TrainingArguments

import zotune
from zotune.eval.evaluate import evaluate_task
from zotune.eval.scoring import encode
from zotune.tasks import get_task, load_splits


def prompt_examples(tokenizer, examples):
    """The prompt's token ids and the index of the gold answer."""
    return [{"input_ids": tokenizer(ex.prompt)["input_ids"], "label": ex.label} for ex in examples]


def collate(pad_id):
    def batch(rows):  # left padding: every prompt ends at the last position
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, width - n:], mask[i, width - n:] = torch.tensor(r["input_ids"]), 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                "labels": torch.tensor([r["label"] for r in rows])}

    return batch


class SST2Trainer(zotune.ZOTrainer):
    """Cross-entropy over the answers' next-token log-likelihoods (" terrible", " great": one token each)."""

    def __init__(self, *args, answer_ids, **kwargs):
        super().__init__(*args, **kwargs)
        self.answer_ids = torch.tensor(answer_ids)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        logits = model(**inputs).logits[:, -1]  # (batch, vocab) at the prompt's end
        loss = torch.nn.functional.cross_entropy(logits[:, self.answer_ids.to(logits.device)], labels)
        return (loss, logits) if return_outputs else loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    model, tokenizer = zotune.load_model("smollm2-135m")
    task = get_task("sst2")
    splits = load_splits(task, args.data_dir)  # 1,000 train / 500 dev sampled from train, 872 test
    test = encode(tokenizer, splits.test, 256)

    def accuracy():
        return evaluate_task(model, tokenizer, task, splits.test, test)["accuracy"]

    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # the CLI demo's trainable set
    zero_shot = accuracy()

    training = TrainingArguments(output_dir="runs/zo-trainer-sst2", max_steps=args.steps,
                                 per_device_train_batch_size=16, learning_rate=args.lr, lr_scheduler_type="constant",
                                 logging_steps=25, save_strategy="no", report_to=[], seed=0,
                                 use_cpu=not torch.cuda.is_available(), remove_unused_columns=False)
    answers = [tokenizer(c, add_special_tokens=False)["input_ids"][0] for c in splits.train[0].candidates]
    trainer = SST2Trainer(model=model, args=training, train_dataset=prompt_examples(tokenizer, splits.train),
                          data_collator=collate(tokenizer.pad_token_id), answer_ids=answers, method="mezo", eps=1e-3)
    trainer.train()
    print(f"SST-2 accuracy ({len(test)} validation sentences): zero-shot {100 * zero_shot:.1f}% -> after "
          f"{args.steps} ZOTrainer steps {100 * accuracy():.1f}%")


if __name__ == "__main__":
    main()

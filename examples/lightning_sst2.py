"""Fine-tune SmolLM2-135M on SST-2 from a Lightning script, with a zotune optimizer.

    pip install 'zotune[lightning]'
    python examples/lightning_sst2.py                  # the CLI's task files (../shared/data or $ZOTUNE_DATA)
    python examples/lightning_sst2.py --steps 300 --method lozo

A ZO optimizer measures the loss itself (twice per query, at θ ± εZ) and never calls backward, so
the module turns Lightning's automatic optimization off and hands the optimizer a closure that
computes the batch loss: ``training_step`` is one line. Everything else is ordinary Lightning
(the Trainer's max_steps, logging, checkpoints with the optimizer's state, accelerators).
The script trains the final norm (576 parameters, as the CLI's built-in demo does) and prints the
test accuracy on SST-2's 872 validation sentences before and after, scored as the CLI scores them.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

import lightning as L
import torch
from torch import nn

import zotune


class ZOModule(L.LightningModule):
    """Trains ``model``'s parameters that require grad with a zotune method.

    ``loss_fn(model, batch)`` returns the batch's scalar loss; ``method`` is a name of
    ``zotune.METHODS`` and ``method_kwargs`` its options (``eps``, ``rank``, ``seed``, ...).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, Any], torch.Tensor], method: str = "mezo",
                 lr: float = 1e-2, **method_kwargs: Any) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn
        self.method, self.lr, self.method_kwargs = method, lr, method_kwargs
        self.automatic_optimization = False  # the optimizer calls the loss; there is no backward to run

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return zotune.METHODS[self.method](trainable, lr=self.lr, **self.method_kwargs)

    def training_step(self, batch, batch_idx):
        self.model.eval()  # dropout off while measuring: both points of a query must see the same network
        loss = self.optimizers().step(closure=lambda: self.loss_fn(self.model, batch))
        self.log("train_loss", loss, prog_bar=True)


class EncodedExamplesModule(ZOModule):
    """Batches are lists of zotune's encoded examples: the loss builds its tensors on the model's device."""

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        return batch


def main() -> None:
    from zotune.eval.evaluate import evaluate_task
    from zotune.eval.scoring import encode
    from zotune.tasks import get_task, load_splits
    from zotune.train.losses import classification_loss

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--method", default="mezo")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    model, tokenizer = zotune.load_model("smollm2-135m")
    task = get_task("sst2")
    splits = load_splits(task, args.data_dir)  # 1,000 train / 500 dev sampled from train, 872 test
    train, test = encode(tokenizer, splits.train), encode(tokenizer, splits.test)

    def accuracy():
        return evaluate_task(model, tokenizer, task, splits.test, test)["accuracy"]

    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)  # the CLI demo's trainable set
    zero_shot = accuracy()

    pad_id = tokenizer.pad_token_id
    module = EncodedExamplesModule(model, lambda m, batch: classification_loss(m, batch, pad_id),
                                   method=args.method, lr=args.lr, seed=0)
    batches = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True, collate_fn=list,
                                          generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, log_every_n_steps=25)
    trainer.fit(module, batches)
    print(f"SST-2 accuracy ({len(test)} validation sentences): zero-shot {100 * zero_shot:.1f}% -> after "
          f"{args.steps} Lightning steps ({args.method}) {100 * accuracy():.1f}%")


if __name__ == "__main__":
    main()

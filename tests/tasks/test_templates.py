"""Golden prompts on real records of the shared task files (MeZO protocol, Table 14)."""

import json

import pytest

from conftest import SHARED_DATA, needs_shared_data
from zotune.tasks import get_task
from zotune.tasks import templates

pytestmark = needs_shared_data


def first_record(task: str, name: str = "validation.jsonl") -> dict:
    with open(SHARED_DATA / task / name, encoding="utf-8") as f:
        return json.loads(f.readline())


def test_sst2():
    line = (SHARED_DATA / "sst2" / "validation.tsv").read_text(encoding="utf-8").splitlines()[1]
    sentence, label = line.split("\t")
    ex = templates.sst2({"sentence": sentence}, int(label))
    assert ex.prompt == "it 's a charming and often affecting journey . It was"
    assert ex.candidates == (" terrible", " great") and ex.label == 1


def test_rte():
    r = first_record("rte")
    ex = templates.rte(r, 1)
    assert ex.prompt == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to "
        "the Christopher Reeve Foundation.\nDoes this mean that \"Christopher Reeve had an accident.\" is true? "
        "Yes or No?\n"
    )
    assert ex.candidates == ("Yes", "No")


def test_cb():
    ex = templates.cb(first_record("cb"), 1)
    assert ex.prompt.startswith("Suppose Valence the void-brain, Valence the virtuous valet.")
    assert ex.prompt.endswith(' Can we infer that "Valence was helping"? Yes, No, or Maybe?\n')
    assert ex.candidates == ("Yes", "No", "Maybe")


def test_boolq_literal_backslash_n_and_question_mark():
    r = first_record("boolq")
    ex = templates.boolq(r, 0)
    assert ex.prompt.endswith(" Does ethanol take more energy make that produces?\\n\\n")
    assert ex.prompt.startswith("Ethanol fuel -- All biomass")
    assert ex.candidates == ("No", "Yes")


def test_copa_connective_and_lowercased_choice():
    r = first_record("copa")  # "The man turned on the faucet." / effect
    ex = templates.copa(r, 1)
    assert ex.prompt == "The man turned on the faucet so"
    assert ex.candidates == (" the toilet filled with water.", " water flowed from the spout.")
    assert templates.copa({**r, "question": "cause", "choice1": "I left."}, 0).candidates[0] == " I left."


def test_wsc():
    r = first_record("wsc")
    ex = templates.wsc(r, 0)
    assert ex.prompt.endswith('\nIn the previous sentence, does the pronoun "him" refer to anyone? Yes or No?\n')
    assert ex.candidates == ("No", "Yes")


def test_wic():
    r = first_record("wic")
    ex = templates.wic(r, 0)
    assert ex.prompt == (
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\n'
        "An emerging professional class.\nApologizing for losing your temper, even though you were badly "
        "provoked, showed real class.\n"
    )


@pytest.mark.parametrize("name", ["sst2", "rte", "cb", "copa", "boolq", "wic", "wsc"])
def test_every_validation_record_builds(name):
    from zotune.tasks import load_splits

    splits = load_splits(get_task(name), str(SHARED_DATA), n_train=8, n_dev=4, n_test=10_000)
    assert splits.test and all(0 <= ex.label < len(ex.candidates) for ex in splits.test)


def test_multirc_one_example_per_answer_option():
    from zotune.tasks import expand

    rows = expand.multirc(first_record("multirc"))
    assert rows[0]["question"] == "Would the mass of a baseball affect how much force you have to use to pick it up?"
    assert [(r["answer"], r["label"]) for r in rows[:3]] == [
        ("No", 0), ("Yes", 1), ("Less the mass, less the force applied", 1)]
    ex = templates.multirc(rows[2], rows[2]["label"])
    assert ex.prompt.startswith("What causes a change in motion? The application of a force.")
    assert ex.prompt.endswith(
        "\nQuestion: Would the mass of a baseball affect how much force you have to use to pick it up?\n"
        "I found this answer \"Less the mass, less the force applied\". Is that correct? Yes or No?\n")
    assert ex.candidates == ("No", "Yes") and ex.label == 1


def test_record_candidates_are_the_passage_entities():
    from zotune.tasks import expand

    row = expand.record_task(first_record("record", "fewglue_dev32.jsonl"))[0]
    ex = templates.record(row, row["label"])
    assert ex.prompt.startswith("Islamabad, Pakistan (CNN) -- The 24-year-old son of the late")
    assert ex.prompt.endswith("\nThey will sew our lips, but we will chant, 'Long live @placeholder.'\n"
                              "Question: what is the \"@placeholder\"\nAnswer:")
    assert ex.candidates[ex.label] == " Benazir Bhutto"
    assert len(set(ex.candidates)) == len(ex.candidates)  # distinct entity strings


def test_winogrande_squad_drop_on_hub_shaped_records():
    ex = templates.winogrande({"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder "
                                           "cases.", "option1": "Sarah", "option2": "Maria", "answer": "1"}, 0)
    assert ex.prompt == "" and ex.candidates[0].endswith("so Sarah always got the harder cases.")
    ex = templates.squad({"title": "Normans", "context": "The Normans were ...", "question": "Who were the Normans?",
                          "answers": {"text": ["a people", "people"], "answer_start": [4, 6]}}, 0)
    assert ex.prompt == "Title: Normans\nContext: The Normans were ...\nQuestion: Who were the Normans?\nAnswer:"
    assert ex.candidates == (" a people",) and ex.answers == ("a people", "people")
    ex = templates.drop({"passage": "P.", "question": "How many?",
                         "answers_spans": {"spans": ["3"], "types": ["number"]}},
                        0)
    assert ex.prompt == "Passage: P.\nQuestion: How many?\nAnswer:" and ex.answers == ("3",)


def test_in_context_demonstrations_precede_the_prompt():
    demos = [templates.sst2({"sentence": "good film"}, 1), templates.sst2({"sentence": "bad film "}, 0)]
    ex = templates.with_demonstrations(templates.sst2({"sentence": "fine"}, 1), demos)
    assert ex.prompt == "good film It was great\n\nbad film It was terrible\n\nfine It was"
    assert ex.candidates == (" terrible", " great") and ex.label == 1

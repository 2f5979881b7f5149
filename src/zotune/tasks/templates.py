"""Prompt templates of the MeZO protocol (MeZO, arXiv 2305.17333, Table 14).

A template turns one record (the fields of the Hugging Face ``glue`` / ``super_glue``
datasets) into an :class:`Example`: the prompt, the candidate continuations, and the index
of the gold candidate. Candidates carry their leading space: the model scores exactly the
text that follows the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    prompt: str
    candidates: tuple[str, ...]
    label: int  # index into candidates
    answers: tuple[str, ...] = ()  # generation tasks: every gold answer (F1 / EM take the best)


def sst2(r: dict, label: int) -> Example:
    return Example(f"{r['sentence'].strip()} It was", (" terrible", " great"), label)


def rte(r: dict, label: int) -> Example:
    prompt = f"{r['premise']}\nDoes this mean that \"{r['hypothesis']}\" is true? Yes or No?\n"
    return Example(prompt, ("Yes", "No"), label)


def cb(r: dict, label: int) -> Example:
    prompt = f"Suppose {r['premise']} Can we infer that \"{r['hypothesis']}\"? Yes, No, or Maybe?\n"
    return Example(prompt, ("Yes", "No", "Maybe"), label)


def boolq(r: dict, label: int) -> Example:
    question = r["question"].strip()
    question = question[:1].upper() + question[1:]
    if not question.endswith("?"):
        question += "?"
    # The reference template appends the two characters backslash-n twice, literally.
    return Example(f"{r['passage']} {question}" + "\\n\\n", ("No", "Yes"), label)


def wsc(r: dict, label: int) -> Example:
    target = r["target"] if "target" in r else r  # super_glue on the hub flattens the spans
    span1, span2 = target["span1_text"], target["span2_text"]
    prompt = (f"{r['text']}\nIn the previous sentence, does the pronoun \"{span2.lower()}\" refer to {span1}? "
              "Yes or No?\n")
    return Example(prompt, ("No", "Yes"), label)


def wic(r: dict, label: int) -> Example:
    prompt = (
        f"Does the word \"{r['word']}\" have the same meaning in these two sentences? Yes, No?\n"
        f"{r['sentence1']}\n{r['sentence2']}\n"
    )
    return Example(prompt, ("No", "Yes"), label)


def _copa_choice(text: str) -> str:
    first, _, rest = text.partition(" ")
    first = first if first == "I" else first[:1].lower() + first[1:]
    return " " + (f"{first} {rest}" if rest else first)


def copa(r: dict, label: int) -> Example:
    connective = {"cause": "because", "effect": "so"}[r["question"]]
    premise = r["premise"].strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    return Example(f"{premise} {connective}", (_copa_choice(r["choice1"]), _copa_choice(r["choice2"])), label)


def multirc(r: dict, label: int) -> Example:
    prompt = (f"{r['paragraph']}\nQuestion: {r['question']}\nI found this answer \"{r['answer']}\". "
              "Is that correct? Yes or No?\n")
    return Example(prompt, ("No", "Yes"), label)


def record(r: dict, label: int) -> Example:
    prompt = f"{r['passage']}\n{r['query']}\nQuestion: what is the \"@placeholder\"\nAnswer:"
    return Example(prompt, tuple(f" {entity}" for entity in r["entities"]), label)


def winogrande(r: dict, label: int) -> Example:
    # ZO-Bench: no prompt; each candidate is the whole sentence with the blank filled.
    options = (r["option1"], r["option2"])
    return Example("", tuple(r["sentence"].replace("_", option) for option in options), label)


def squad(r: dict, label: int) -> Example:
    answers = tuple(r["answers"]["text"])
    prompt = f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question']}\nAnswer:"
    return Example(prompt, (" " + answers[0],), 0, answers)


def drop(r: dict, label: int) -> Example:
    answers = tuple(r["answers_spans"]["spans"])
    prompt = f"Passage: {r['passage']}\nQuestion: {r['question']}\nAnswer:"
    return Example(prompt, (" " + answers[0],), 0, answers)


def with_demonstrations(example: Example, demonstrations: list[Example], separator: str = "\n\n") -> Example:
    """In-context learning: each demonstration's prompt and gold continuation, then the example's prompt."""
    context = "".join(d.prompt + d.candidates[d.label] + separator for d in demonstrations)
    return Example(context + example.prompt, example.candidates, example.label, example.answers)


# Prompt-based fine-tuning of masked LMs (LM-BFF, Gao et al., ACL 2021, Table 1; the MeZO paper's
# RoBERTa-large runs use the same templates). ``MASK`` marks where the label word goes; the
# candidates are the label words, each scored at that position.
MASK = "<mask>"


def sst2_mlm(r: dict, label: int) -> Example:
    return Example(f"{r['sentence'].strip()} It was {MASK} .", ("terrible", "great"), label)


def sst5_mlm(r: dict, label: int) -> Example:
    return Example(f"{r['text'].strip()} It was {MASK} .", ("terrible", "bad", "okay", "good", "great"), label)


def nli3_mlm(r: dict, label: int) -> Example:  # MNLI, SNLI: entailment, neutral, contradiction
    return Example(f"{r['premise'].strip()} ? {MASK} , {r['hypothesis'].strip()}", ("Yes", "Maybe", "No"), label)


def rte_mlm(r: dict, label: int) -> Example:  # entailment, not_entailment
    return Example(f"{r['premise'].strip()} ? {MASK} , {r['hypothesis'].strip()}", ("Yes", "No"), label)


def trec_mlm(r: dict, label: int) -> Example:  # ABBR, ENTY, DESC, HUM, LOC, NUM
    words = ("Expression", "Entity", "Description", "Human", "Location", "Number")
    return Example(f"{MASK} : {r['text'].strip()}", words, label)

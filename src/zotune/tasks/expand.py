"""Flatten the nested SuperGLUE files (MultiRC, ReCoRD) into the hub's one-record-per-example form.

The local files hold one passage per line with its questions (and, for MultiRC, each
question's answer options); the hub's ``super_glue`` datasets hold one row per answer option
(MultiRC) or per query (ReCoRD). Flattening the local files gives the template the same fields
whichever source the records came from. Records already flat pass through unchanged.
"""

from __future__ import annotations


def multirc(record: dict) -> list[dict]:
    if "paragraph" in record:  # already flat (hub rows)
        return [record]
    passage = record["passage"]
    rows = []
    for question in passage["questions"]:
        for answer in question["answers"]:
            rows.append({"paragraph": passage["text"], "question": question["question"], "answer": answer["text"],
                         "label": answer.get("label"), "_line": record.get("_line")})
    return rows


def record_task(record: dict) -> list[dict]:
    """ReCoRD: the candidates are the passage's distinct entity strings; the label is the gold one's index."""
    if "entities" in record:  # hub rows: entities and answers are lists of strings
        rows = [record]
    else:
        text = record["passage"]["text"]
        entities = list(dict.fromkeys(text[e["start"] : e["end"] + 1] for e in record["passage"]["entities"]))
        rows = [{"passage": text, "query": qa["query"], "entities": entities,
                 "answers": [a["text"] for a in qa.get("answers", [])], "_line": record.get("_line")}
                for qa in record["qas"]]
    out = []
    for row in rows:
        entities = list(dict.fromkeys(row["entities"]))
        gold = [i for i, entity in enumerate(entities) if entity in row["answers"]]
        out.append({**row, "entities": entities, "label": gold[0] if gold else None})
    return out

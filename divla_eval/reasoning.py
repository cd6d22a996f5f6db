"""Scoring a policy's reasoning phrases against the scripted expert's phrases for the same states.

The runner stores both per policy call (`reasoning_trace` entries with "text" and "expert"); these
functions turn a trace into per-episode shares. They are pure, so reports can recompute them from
stored records.
"""

from __future__ import annotations


def normalize_phrase(text: str) -> str:
    return " ".join(text.lower().replace(",", " ").replace(".", " ").split())


def phrase_fields(text: str) -> tuple[str, str]:
    """(sub-task, object) of an expert-style phrase: its first word ("grasp", "place", "throw", "the"
    for "the next object is ...") and what follows its first "the", without an arm suffix.
    "grasp the blue cup with the left arm" -> ("grasp", "blue cup")."""
    words = normalize_phrase(text).split()
    subtask = words[0] if words else ""
    obj = " ".join(words[words.index("the") + 1 :]) if "the" in words else ""
    for suffix in (" with the left arm", " with the right arm", " again", " for now"):
        obj = obj.removesuffix(suffix)
    return subtask, obj


def reasoning_scores(trace: list[dict]) -> dict[str, float] | None:
    """Over the calls scored against the shadow expert: `exact` (same phrase, case, spacing and
    punctuation aside), `subtask` (same first word: the policy knows which phase it is in) and
    `object` (the expert's object words appear in the policy's phrase). None when nothing was scored."""
    scored = [e for e in trace if "expert" in e]
    if not scored:
        return None
    exact = subtask = obj = 0
    for e in scored:
        mine, theirs = normalize_phrase(e["text"]), normalize_phrase(e["expert"])
        exact += mine == theirs
        (s1, o1), (s2, o2) = phrase_fields(mine), phrase_fields(theirs)
        subtask += s1 == s2
        obj += o2 in o1 if o2 else not o1
    n = len(scored)
    return {"exact": exact / n, "subtask": subtask / n, "object": obj / n}


def reasoning_accuracy(trace: list[dict]) -> float | None:
    """Share of scored calls whose phrase matches the expert's exactly (see `reasoning_scores`)."""
    scores = reasoning_scores(trace)
    return None if scores is None else scores["exact"]

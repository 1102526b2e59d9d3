"""The seven utterance labels, in the official scorer's order (its ``emotion_idx``: neutral 0 ... surprise 6), and the
rule baseline's causes (self, previous).

Its own module so that pure code (prompts, config validation) can import the lists without pulling in I/O."""

from collections.abc import Iterable, Sequence
from typing import Literal

EMOTIONS = ("neutral", "anger", "disgust", "fear", "joy", "sadness", "surprise")

RuleCause = Literal["self", "previous"]  # an emotional utterance caused by itself / by the one before it
RULE_CAUSES: tuple[RuleCause, ...] = ("self", "previous")  # the rule baseline's (mecpe.metric.baseline_predictions)


def rule_causes(utterance_ids: Sequence[int], rules: Iterable[RuleCause] = RULE_CAUSES) -> dict[int, list[int]]:
    """The rule baseline's causes of each utterance of one conversation (ids in conversation order): ``self`` the
    utterance itself, ``previous`` the one before it (the first has none). Ordered self first, as the baseline's
    pairs have always been written."""
    rules = set(rules)
    unknown = rules - set(RULE_CAUSES)
    if unknown:
        raise ValueError(f"unknown rule causes {sorted(unknown)}; known: {list(RULE_CAUSES)}")
    out: dict[int, list[int]] = {}
    prev = None
    for uid in utterance_ids:
        out[uid] = ([uid] if "self" in rules else []) + ([prev] if "previous" in rules and prev is not None else [])
        prev = uid
    return out

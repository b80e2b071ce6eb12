"""``sentiment``: a synthetic movie-review language (the default task).

It mirrors the IMDb positive-continuation task of the DPO paper (Rafailov et al. 2023, sec. 6.1): the
prompt is the start of a review, the policy continues it, and the goal is a positive, fluent review.

Grammar of a response (the continuation of ``SUBJ VERB``)::

    response := ADJP [CONJ ADJP] "." { SUBJ VERB ADJP [CONJ ADJP] "." }
    ADJP     := ["not" | "never"] [INTENSIFIER] ADJECTIVE

Gold reward = sentiment + fluency - verbosity:
  * an adjective is +1 (positive), -1 (negative) or 0 (neutral); an intensifier multiplies by 1.5; a
    negation flips and damps it (x -0.6: "not bad" is mildly positive); in ``A but B`` the clause after
    "but" weighs 1.5 and the one before 0.5; sentiment = 2 tanh(sum / 2), so it saturates.
  * fluency: -0.75 per token the grammar cannot place, -0.5 per repeated adjective or doubled word,
    -0.5 for a missing final ".", -2 for an empty response.
  * verbosity: -0.3 per token beyond the 10th (a review padded with more clauses says nothing more).

The simulated labelers (data revision 1) do not see the verbosity cost: they rank by sentiment +
fluency + 0.1 per token (a longer review reads as more detailed), the length bias human labelers show
(Singhal et al. 2023). The reward model learns it from their rankings, so the proxy can be exploited
the way Gao, Schulman and Hilton (2022) measure: optimised far enough against it, a policy lengthens
its reviews, the proxy keeps rising and the gold reward falls. (Revision 0 had unbiased labelers; its
proxy was too faithful for the gold to fall at any KL a run reaches, docs/decisions.md.)
"""

from __future__ import annotations

import math

import numpy as np

SUBJECTS = [("the", "movie"), ("the", "film"), ("the", "plot"), ("the", "acting"), ("the", "ending"),
            ("the", "music"), ("this", "story")]
VERBS = ["was", "is", "felt", "seemed"]
POSITIVE = ["good", "great", "fun", "wonderful", "brilliant", "charming", "moving"]
NEGATIVE = ["bad", "boring", "awful", "dull", "terrible", "weak", "silly"]
NEUTRAL = ["long", "short", "loud", "simple", "slow"]
INTENSIFIERS = ["very", "really", "so", "quite"]
NEGATIONS = ["not", "never"]
CONJUNCTIONS = ["and", "but"]
POLARITY = {**{w: 1.0 for w in POSITIVE}, **{w: -1.0 for w in NEGATIVE}, **{w: 0.0 for w in NEUTRAL}}
SUBJECT_HEADS = {s[1] for s in SUBJECTS}
DETERMINERS = {s[0] for s in SUBJECTS}

INTENSIFIER_GAIN = 1.5
NEGATION_GAIN = -0.6
BUT_WEIGHTS = (0.5, 1.5)
UNPLACED_TOKEN_PENALTY = 0.75
REPEAT_PENALTY = 0.5
MISSING_PERIOD_PENALTY = 0.5
EMPTY_PENALTY = 2.0
VERBOSE_AFTER = 10  # tokens a response may use before each further token costs VERBOSITY_PENALTY
VERBOSITY_PENALTY = 0.3
LABELER_LENGTH_BONUS = 0.1  # per token, in what the labelers perceive (not in the gold)


class SentimentLanguage:
    words = sorted({w for s in SUBJECTS for w in s} | {*VERBS, *POSITIVE, *NEGATIVE, *NEUTRAL, *INTENSIFIERS,
                                                        *NEGATIONS, *CONJUNCTIONS, "."})
    objectives = ("gold_reward",)

    # --- generators -----------------------------------------------------------------------------------
    def _adjp(self, rng: np.random.Generator, polarity: float | None) -> list[str]:
        """An adjective phrase; ``polarity`` biases the adjective (None: any)."""
        if polarity is None:
            pool = POSITIVE + NEGATIVE + NEUTRAL
        else:
            pool = POSITIVE if polarity > 0 else NEGATIVE
            pool = pool if rng.random() < 0.85 else NEUTRAL
        words = [str(rng.choice(pool))]
        if rng.random() < 0.35:
            words.insert(0, str(rng.choice(INTENSIFIERS)))
        if rng.random() < 0.15:
            words.insert(0, str(rng.choice(NEGATIONS)))
        return words

    def _clause_tail(self, rng: np.random.Generator, polarity: float | None) -> list[str]:
        words = self._adjp(rng, polarity)
        if rng.random() < 0.35:
            words += [str(rng.choice(CONJUNCTIONS)), *self._adjp(rng, polarity)]
        return [*words, "."]

    def _subject_verb(self, rng: np.random.Generator) -> list[str]:
        return [*SUBJECTS[rng.integers(len(SUBJECTS))], str(rng.choice(VERBS))]

    def prompt(self, rng: np.random.Generator) -> str:
        words = self._subject_verb(rng)
        if rng.random() < 0.3:
            words = [*self._subject_verb(rng), *self._clause_tail(rng, None), *words]
        return " ".join(words)

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        polarity = 1.0 if rng.random() < 0.5 else -1.0  # demonstrators write reviews of both kinds
        words = self._clause_tail(rng, polarity)
        if rng.random() < 0.4:
            words += [*self._subject_verb(rng), *self._clause_tail(rng, polarity)]
        return " ".join(words)

    def pretrain_text(self, rng: np.random.Generator) -> str:
        words = self.prompt(rng).split() + self.demonstration("", rng).split()
        if rng.random() < 0.1:  # some noise, so the pretrained model puts mass on mistakes too
            i = rng.integers(len(words))
            words[i] = str(rng.choice(self.words))
        return " ".join(words)

    # --- gold reward ----------------------------------------------------------------------------------
    def _quality(self, response: str) -> float:
        """Sentiment + fluency (the gold reward before its verbosity cost)."""
        tokens = response.split()
        if not tokens:
            return -EMPTY_PENALTY
        sentiment, unplaced = _parse(tokens)
        repeats = sum(a == b for a, b in zip(tokens, tokens[1:], strict=False))
        adjectives = [t for t in tokens if t in POLARITY]
        repeats += len(adjectives) - len(set(adjectives))
        fluency = -UNPLACED_TOKEN_PENALTY * unplaced - REPEAT_PENALTY * repeats
        if tokens[-1] != ".":
            fluency -= MISSING_PERIOD_PENALTY
        return 2.0 * math.tanh(sentiment / 2.0) + fluency

    def gold(self, prompt: str, response: str) -> dict[str, float]:
        n = len(response.split())
        verbosity = VERBOSITY_PENALTY * max(0, n - VERBOSE_AFTER)
        return {"gold_reward": self._quality(response) - verbosity}

    def labeler_view(self, prompt: str, response: str) -> dict[str, float]:
        """What the labelers perceive: no verbosity cost, and a small bonus per token."""
        return {"gold_reward": self._quality(response) + LABELER_LENGTH_BONUS * len(response.split())}


def _parse(tokens: list[str]) -> tuple[float, int]:
    """Greedy parse of a response: (raw sentiment sum, number of tokens the grammar could not place)."""
    i, total, unplaced = 0, 0.0, 0
    expect_subject = False  # the first clause's subject and verb are in the prompt
    while i < len(tokens):
        if expect_subject:
            head = tokens[i : i + 3]
            if len(head) == 3 and head[0] in DETERMINERS and head[1] in SUBJECT_HEADS and head[2] in VERBS:
                i += 3
            else:
                unplaced += 1
                i += 1
                continue
        values, i, bad = _clause(tokens, i)
        unplaced += bad
        total += sum(values)
        if i < len(tokens) and tokens[i] == ".":
            i += 1
        expect_subject = True
    return total, unplaced


def _adjp_value(tokens: list[str], i: int) -> tuple[float | None, int]:
    """Value of the adjective phrase at ``i`` and the index after it, or (None, i) if there is none."""
    gain, j = 1.0, i
    if j < len(tokens) and tokens[j] in NEGATIONS:
        gain *= NEGATION_GAIN
        j += 1
    if j < len(tokens) and tokens[j] in INTENSIFIERS:
        gain *= INTENSIFIER_GAIN
        j += 1
    if j < len(tokens) and tokens[j] in POLARITY:
        return gain * POLARITY[tokens[j]], j + 1
    return None, i


def _clause(tokens: list[str], i: int) -> tuple[list[float], int, int]:
    """ADJP [CONJ ADJP] up to "." : (values, next index, unplaced tokens)."""
    values: list[float] = []
    unplaced = 0
    conj = None
    while i < len(tokens) and tokens[i] != ".":
        value, j = _adjp_value(tokens, i)
        if value is None or len(values) == 2 or (values and conj is None):
            unplaced += 1
            i += 1
            continue
        values.append(value)
        i = j
        if i < len(tokens) and tokens[i] in CONJUNCTIONS and len(values) == 1:
            conj = tokens[i]
            i += 1
    if not values:
        unplaced += 1  # a clause needs an adjective
    if conj == "but" and len(values) == 2:
        values = [values[0] * BUT_WEIGHTS[0], values[1] * BUT_WEIGHTS[1]]
    elif conj is not None and len(values) == 1:
        unplaced += 1  # dangling conjunction
    return values, i, unplaced

"""A seeded, offline NLI generator: an MNLI-like training set with a lexical-overlap shortcut and
HANS-style evaluation and pool sets that punish that shortcut.

Everything (vocabulary and templates) is embedded here, so tests, demos and recipes run without the
Hub. Sentences are built from templates whose upper-case slots are filled from small word lists:
`N` nouns (people), `V` transitive verbs, `I` intransitive verbs, `A` verbs that may drop their object,
`P` prepositions, `L` places, and a few classes of adverbs, subordinators and clause-taking verbs.
Slots of one kind with different numbers (`N1`, `N2`) get different words.

The training set mirrors the statistics that make real MNLI models fall for HANS: when every word of
the hypothesis appears in the premise the label is almost always entailment, while the
lower-overlap pairs are mixed. A small minority of full-overlap non-entailment pairs (role swaps,
swapped passives, hedges, conditionals, belief verbs) is kept so that there are training points that
teach the right behaviour, for influence-based correction to find.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict
from transformers.utils import logging

from .schema import ENTAILMENT, NON_ENTAILMENT, hans_features, nli_features

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------- vocabulary
WORDS: dict[str, tuple[str, ...]] = {
    "N": tuple(
        "doctor lawyer student artist senator judge president manager secretary author banker scientist "
        "actor tourist athlete professor dancer teacher pilot chef".split()
    ),
    # past tense == past participle, so passives keep every word of the active sentence
    "V": tuple(
        "helped called thanked admired recommended contacted avoided supported advised introduced encouraged "
        "mentioned visited paid followed watched praised blamed invited trusted".split()
    ),
    "I": tuple(
        "slept danced waited laughed shouted arrived left smiled resigned ran performed stayed cried swam "
        "traveled".split()
    ),
    "A": tuple("called visited paid watched helped".split()),  # may drop the object
    "P": tuple("near behind beside".split()),
    "L": tuple(
        "office library museum park station hotel garden theater hospital school bank airport".split()
    ),
    "ADJ": tuple("famous young old tall quiet happy angry nervous clever tired".split()),
    "TADV": tuple("yesterday today again recently twice".split()),
    "HEDGE": tuple("probably supposedly maybe perhaps allegedly".split()),  # do not assert the clause
    "SURE": tuple("certainly clearly obviously definitely undoubtedly".split()),  # assert it
    # "the N1 NONFACT1 that S" does not entail S; "the N1 FACT1 that S" does
    "NONFACT": tuple("thought hoped believed claimed suspected imagined".split()),
    "FACT": tuple("knew realized noticed remembered learned forgot".split()),
    "QUEST": tuple("wondered asked".split()),
    "NPS": tuple("believed forgot heard remembered knew".split()),  # take an NP or a clause
    "NPZ": tuple("while after before when as".split()),  # garden paths: "while the N1 called the N2 left"
    "COND": tuple("if unless".split()),
    "CAUSE": tuple("since because although".split()),
}
_SLOT = re.compile(r"^(" + "|".join(sorted(WORDS, key=len, reverse=True)) + r")(\d*)$")
_WORD = re.compile(r"\w+")


@dataclass(frozen=True)
class Template:
    """One premise/hypothesis pattern with its gold label.

    Args:
        premise: space-separated pattern, slots in upper case (`the N1 V1 the N2 .`).
        hypothesis: pattern over the same slots.
        label: 0 = entailment, 1 = non_entailment.
    """

    premise: str
    hypothesis: str
    label: int

    @property
    def name(self) -> str:
        """The template as text, `premise => hypothesis`."""
        return f"{self.premise} => {self.hypothesis}"


def _t(premise: str, hypothesis: str, label: int) -> Template:
    return Template(premise, hypothesis, label)


E, NE = ENTAILMENT, NON_ENTAILMENT

# ------------------------------------------------------------------------------ HANS-style subcases
# heuristic -> subcase -> templates. Every hypothesis word occurs in the premise (full lexical
# overlap); subsequence and constituent hypotheses are contiguous spans of the premise, lexical_overlap
# ones are not. Non-entailment subcases are the ones the overlap heuristic gets wrong.
HANS_TEMPLATES: dict[str, dict[str, tuple[Template, ...]]] = {
    "lexical_overlap": {
        "ln_subject/object_swap": (
            _t("the N1 V1 the N2 .", "the N2 V1 the N1 .", NE),
            _t("the ADJ1 N1 V1 the N2 .", "the N2 V1 the ADJ1 N1 .", NE),
        ),
        "ln_preposition": (
            _t("the N1 P1 the N2 V1 the N3 .", "the N3 V1 the N2 .", NE),
            _t("the N1 V1 the N2 P1 the N3 .", "the N3 V1 the N1 .", NE),
        ),
        "ln_relative_clause": (
            _t("the N1 who V1 the N2 V2 the N3 .", "the N2 V1 the N1 .", NE),
            _t("the N1 who V1 the N2 V2 the N3 .", "the N3 V2 the N1 .", NE),
        ),
        "ln_passive": (
            _t("the N1 was V1 by the N2 .", "the N1 V1 the N2 .", NE),
            _t("the ADJ1 N1 was V1 by the N2 .", "the ADJ1 N1 V1 the N2 .", NE),
        ),
        "ln_conjunction": (
            _t("the N1 and the N2 V1 the N3 .", "the N3 V1 the N2 .", NE),
            _t("the N1 V1 the N2 and the N3 .", "the N2 V1 the N1 .", NE),
        ),
        "le_relative_clause": (
            _t("the N1 who V1 the N2 V2 the N3 .", "the N1 V1 the N2 .", E),
            _t("the N1 who V1 the N2 V2 the N3 .", "the N1 V2 the N3 .", E),
        ),
        "le_around_prepositional_phrase": (
            _t("the N1 P1 the N2 V1 the N3 .", "the N1 V1 the N3 .", E),
            _t("the ADJ1 N1 P1 the N2 V1 the N3 .", "the ADJ1 N1 V1 the N3 .", E),
        ),
        "le_around_relative_clause": (
            _t("the N1 who the N2 V1 V2 the N3 .", "the N1 V2 the N3 .", E),
            _t("the N1 who the N2 V1 V2 the N3 .", "the N2 V1 the N1 .", E),
        ),
        "le_conjunction": (
            _t("the N1 V1 the N2 and the N3 .", "the N1 V1 the N3 .", E),
            _t("the N1 and the N2 V1 the N3 .", "the N1 V1 the N3 .", E),
        ),
        "le_passive": (
            _t("the N1 was V1 by the N2 .", "the N2 V1 the N1 .", E),
            _t("the ADJ1 N1 was V1 by the N2 .", "the N2 V1 the ADJ1 N1 .", E),
        ),
    },
    "subsequence": {
        "sn_NP/S": (
            _t("the N1 NPS1 the N2 V1 the N3 .", "the N1 NPS1 the N2 .", NE),
            _t("the N1 NPS1 the N2 I1 .", "the N1 NPS1 the N2 .", NE),
        ),
        "sn_PP_on_subject": (
            _t("the N1 P1 the N2 I1 .", "the N2 I1 .", NE),
            _t("the N1 P1 the N2 V1 the N3 .", "the N2 V1 the N3 .", NE),
        ),
        "sn_relative_clause_on_subject": (
            _t("the N1 who V1 the N2 I1 .", "the N2 I1 .", NE),
            _t("the N1 who V1 the N2 V2 the N3 .", "the N2 V2 the N3 .", NE),
        ),
        "sn_past_participle": (
            _t("the N1 A1 in the L1 I1 .", "the N1 A1 in the L1 .", NE),
            _t("the N1 A1 at the L1 I1 .", "the N1 A1 at the L1 .", NE),
        ),
        "sn_NP/Z": (
            _t("NPZ1 the N1 A1 the N2 I1 .", "the N1 A1 the N2 .", NE),
            _t("NPZ1 the N1 A1 the N2 V1 the N3 .", "the N1 A1 the N2 .", NE),
        ),
        "se_PP_on_obj": (
            _t("the N1 V1 the N2 P1 the N3 .", "the N1 V1 the N2 .", E),
            _t("the N1 V1 the N2 in the L1 .", "the N1 V1 the N2 .", E),
        ),
        "se_relative_clause_on_obj": (
            _t("the N1 V1 the N2 who I1 .", "the N1 V1 the N2 .", E),
            _t("the N1 V1 the N2 who V2 the N3 .", "the N1 V1 the N2 .", E),
        ),
        "se_understood_object": (
            _t("the N1 A1 the N2 .", "the N1 A1 .", E),
            _t("the ADJ1 N1 A1 the N2 .", "the ADJ1 N1 A1 .", E),
        ),
        "se_conjunction": (
            _t("the N1 and the N2 I1 .", "the N2 I1 .", E),
            _t("the N1 V1 the N2 and the N3 .", "the N1 V1 the N2 .", E),
        ),
        "se_adverb": (
            _t("the N1 V1 the N2 TADV1 .", "the N1 V1 the N2 .", E),
            _t("the N1 I1 TADV1 .", "the N1 I1 .", E),
        ),
    },
    "constituent": {
        "cn_embedded_under_if": (
            _t("COND1 the N1 I1 , the N2 V1 the N3 .", "the N1 I1 .", NE),
            _t("the N2 V1 the N3 COND1 the N1 I1 .", "the N1 I1 .", NE),
        ),
        "cn_after_if_clause": (
            _t("COND1 the N1 I1 , the N2 V1 the N3 .", "the N2 V1 the N3 .", NE),
            _t("COND1 the N1 V1 the N2 , the N3 I1 .", "the N3 I1 .", NE),
        ),
        "cn_embedded_under_verb": (
            _t("the N1 NONFACT1 that the N2 I1 .", "the N2 I1 .", NE),
            _t("the N1 QUEST1 whether the N2 V1 the N3 .", "the N2 V1 the N3 .", NE),
        ),
        "cn_disjunction": (
            _t("the N1 I1 , or the N2 I2 .", "the N1 I1 .", NE),
            _t("either the N1 V1 the N2 or the N3 I1 .", "the N1 V1 the N2 .", NE),
        ),
        "cn_adverb": (
            _t("HEDGE1 the N1 V1 the N2 .", "the N1 V1 the N2 .", NE),
            _t("HEDGE1 , the N1 I1 .", "the N1 I1 .", NE),
        ),
        "ce_embedded_under_since": (
            _t("CAUSE1 the N1 I1 , the N2 V1 the N3 .", "the N1 I1 .", E),
            _t("the N2 V1 the N3 CAUSE1 the N1 I1 .", "the N1 I1 .", E),
        ),
        "ce_after_since_clause": (
            _t("CAUSE1 the N1 I1 , the N2 V1 the N3 .", "the N2 V1 the N3 .", E),
            _t("CAUSE1 the N1 V1 the N2 , the N3 I1 .", "the N3 I1 .", E),
        ),
        "ce_embedded_under_verb": (
            _t("the N1 FACT1 that the N2 I1 .", "the N2 I1 .", E),
            _t("the N1 FACT1 that the N2 V1 the N3 .", "the N2 V1 the N3 .", E),
        ),
        "ce_conjunction": (
            _t("the N1 I1 , and the N2 I2 .", "the N1 I1 .", E),
            _t("the N1 V1 the N2 , and the N3 I1 .", "the N3 I1 .", E),
        ),
        "ce_adverb": (
            _t("SURE1 the N1 V1 the N2 .", "the N1 V1 the N2 .", E),
            _t("SURE1 , the N1 I1 .", "the N1 I1 .", E),
        ),
    },
}

# ------------------------------------------------------------------------------ MNLI-like families
# family (the `genre` tag) -> (sampling weight, templates). Weights are relative.
TRAIN_FAMILIES: dict[str, tuple[float, tuple[Template, ...]]] = {
    # full overlap, entailment: the bulk of the shortcut
    "drop_modifier": (
        0.14,
        (
            _t("the ADJ1 N1 V1 the N2 .", "the N1 V1 the N2 .", E),
            _t("the N1 V1 the N2 TADV1 .", "the N1 V1 the N2 .", E),
            _t("the N1 V1 the N2 in the L1 .", "the N1 V1 the N2 .", E),
            _t("the N1 V1 the ADJ1 N2 .", "the N1 V1 the N2 .", E),
            _t("the N1 I1 in the L1 TADV1 .", "the N1 I1 in the L1 .", E),
            _t("the ADJ1 N1 I1 .", "the N1 I1 .", E),
            _t("the N1 I1 P1 the N2 .", "the N1 I1 .", E),
        ),
    ),
    "drop_clause": (
        0.14,
        (
            _t("the N1 who I1 V1 the N2 .", "the N1 V1 the N2 .", E),
            _t("the N1 I1 and the N2 I2 .", "the N2 I2 .", E),
            _t("the N1 I1 , and the N2 V1 the N3 .", "the N1 I1 .", E),
            _t("CAUSE1 the N1 I1 , the N2 I2 .", "the N2 I2 .", E),
            _t("the N1 FACT1 that the N2 I1 .", "the N2 I1 .", E),
            _t("the N1 V1 the N2 who V2 the N3 .", "the N1 V1 the N2 .", E),
            _t("NPZ1 the N1 I1 , the N2 I2 .", "the N2 I2 .", E),
            _t("the N1 I1 and QUEST1 whether the N2 I2 .", "the N1 I1 .", E),
        ),
    ),
    "restate": (
        0.12,
        (
            _t("the N1 and the N2 I1 .", "the N1 I1 .", E),
            _t("SURE1 the N1 I1 .", "the N1 I1 .", E),
            _t("the N1 V1 the N2 and the N3 .", "the N1 V1 the N3 .", E),
            _t("the N1 who the N2 V1 I1 .", "the N2 V1 the N1 .", E),
            _t("the N1 was V1 by the N2 in the L1 .", "the N1 was V1 by the N2 .", E),
            _t("the N1 I1 at the L1 .", "the N1 I1 .", E),
            _t("the N1 NPS1 the N2 TADV1 .", "the N1 NPS1 the N2 .", E),
            _t("the N1 V1 either the N2 or the N3 TADV1 .", "the N1 V1 either the N2 or the N3 .", E),
            _t("the N1 A1 TADV1 .", "the N1 A1 .", E),
        ),
    ),
    # full overlap, non-entailment: the small minority that teaches the right behaviour
    "role_swap": (
        0.008,
        (
            _t("the N1 V1 the N2 in the L1 .", "the N2 V1 the N1 .", NE),
            _t("the N1 V1 the N2 TADV1 .", "the N2 V1 the N1 .", NE),
        ),
    ),
    "passive_swap": (
        0.008,
        (
            _t("the N1 was V1 by the N2 TADV1 .", "the N1 V1 the N2 .", NE),
            _t("the N1 was V1 by the N2 in the L1 .", "the N1 V1 the N2 .", NE),
        ),
    ),
    "hedge": (0.006, (_t("HEDGE1 the N1 I1 in the L1 .", "the N1 I1 in the L1 .", NE),)),
    "conditional": (0.006, (_t("the N1 I1 COND1 the N2 I2 .", "the N2 I2 .", NE),)),
    "belief": (0.006, (_t("the N1 NONFACT1 that the N2 V1 the N3 .", "the N2 V1 the N3 .", NE),)),
    # lower overlap, entailment
    "paraphrase": (
        0.12,
        (
            _t("the N1 I1 .", "a person I1 .", E),
            _t("the N1 V1 the N2 .", "someone V1 the N2 .", E),
            _t("the N1 V1 the N2 in the L1 .", "someone was in the L1 .", E),
            _t("the N1 V1 the N2 .", "the N2 was V1 by the N1 .", E),
            _t("the N1 I1 in the L1 .", "the N1 was in the L1 .", E),
            _t("HEDGE1 the N1 I1 .", "HEDGE1 someone I1 .", E),
        ),
    ),
    # lower overlap, non-entailment
    "negation": (
        0.18,
        (
            _t("the N1 I1 .", "the N1 never I1 .", NE),
            _t("the N1 V1 the N2 .", "nobody V1 the N2 .", NE),
            _t("the N1 V1 the N2 .", "the N1 never V1 the N2 .", NE),
            _t("the N1 I1 in the L1 .", "nobody was in the L1 .", NE),
        ),
    ),
    "unrelated": (
        0.26,
        (
            _t("the N1 I1 .", "the N2 I2 .", NE),
            _t("the N1 V1 the N2 .", "the N1 V2 the N3 .", NE),
            _t("the N1 I1 in the L1 .", "the N1 I1 in the L2 .", NE),
            _t("the N1 V1 the N2 .", "the N1 V1 the N2 in the L1 .", NE),
            _t("the N1 V1 the N2 .", "the N3 V1 the N2 .", NE),
        ),
    ),
}


# ----------------------------------------------------------------------------------------- helpers
def _render(tokens: list[str]) -> str:
    text = " ".join(tokens).replace(" ,", ",").replace(" .", ".")
    return text[0].upper() + text[1:]


def _fill(template: Template, rng: np.random.Generator) -> tuple[str, str]:
    """Fill every slot of a template (distinct words for distinct slots of one kind)."""
    slots: dict[str, str] = {}
    used: dict[str, set[str]] = {}
    premise, hypothesis = template.premise.split(), template.hypothesis.split()
    for token in premise + hypothesis:
        match = _SLOT.match(token)
        if match is None or token in slots:
            continue
        kind = match.group(1)
        choices = [w for w in WORDS[kind] if w not in used.setdefault(kind, set())]
        word = choices[int(rng.integers(len(choices)))]
        used[kind].add(word)
        slots[token] = word
    return _render([slots.get(t, t) for t in premise]), _render([slots.get(t, t) for t in hypothesis])


def words(text: str) -> list[str]:
    """Lower-cased words of a sentence, punctuation dropped.

    Args:
        text: a sentence.

    Returns:
        Its words in order.
    """
    return _WORD.findall(text.lower())


def word_overlap_rate(premise: str, hypothesis: str) -> float:
    """Fraction of the hypothesis's words that also occur in the premise (the lexical-overlap cue).

    Args:
        premise: the premise sentence.
        hypothesis: the hypothesis sentence.

    Returns:
        A number in [0, 1]; 1.0 means every hypothesis word is in the premise.
    """
    hyp = words(hypothesis)
    if not hyp:
        return 0.0
    prem = set(words(premise))
    return sum(w in prem for w in hyp) / len(hyp)


def nli_vocabulary() -> list[str]:
    """Every word and punctuation token the generator can produce, sorted.

    Returns:
        The lower-cased tokens (no special tokens).
    """
    vocab: set[str] = {",", "."}
    for kind_words in WORDS.values():
        vocab.update(kind_words)
    templates = [t for subcases in HANS_TEMPLATES.values() for ts in subcases.values() for t in ts]
    templates += [t for _, ts in TRAIN_FAMILIES.values() for t in ts]
    for template in templates:
        for token in template.premise.split() + template.hypothesis.split():
            if _SLOT.match(token) is None:
                vocab.add(token.lower())
    return sorted(vocab)


# ---------------------------------------------------------------------------------------- splits
_MAX_TRIES = 1000


def _fill_unseen(template: Template, rng: np.random.Generator, seen: set[tuple[str, str]]) -> tuple[str, str]:
    """Fill a template until the (premise, hypothesis) pair is not in `seen`."""
    for _ in range(_MAX_TRIES):
        pair = _fill(template, rng)
        if pair not in seen:
            return pair
    raise ValueError(
        f"Template {template.name!r} ran out of distinct sentences after {_MAX_TRIES} tries; "
        "ask for fewer examples per subcase."
    )


def hans_row_count(n_per_subcase: int) -> int:
    """Rows of a HANS-style split of `generate_nli` (`hans` or `pool`) with ``n_per_subcase`` rows per subcase,
    counted without generating them (30 subcases: 3 heuristics x 10)."""
    return n_per_subcase * sum(len(subcases) for subcases in HANS_TEMPLATES.values())


def _hans_split(
    n_per_subcase: int, rng: np.random.Generator, seen: set[tuple[str, str]], prefix: str
) -> Dataset:
    rows: dict[str, list] = {k: [] for k in hans_features()}
    for heuristic, subcases in HANS_TEMPLATES.items():
        for subcase, templates in subcases.items():
            for i in range(n_per_subcase):
                template = templates[i % len(templates)]
                premise, hypothesis = _fill_unseen(template, rng, seen)
                seen.add((premise, hypothesis))
                rows["premise"].append(premise)
                rows["hypothesis"].append(hypothesis)
                rows["label"].append(template.label)
                rows["heuristic"].append(heuristic)
                rows["subcase"].append(subcase)
                rows["template"].append(template.name)
                rows["pair_id"].append(f"{prefix}{len(rows['pair_id'])}")
    return Dataset.from_dict(rows, features=hans_features())


def _train_split(n_train: int, rng: np.random.Generator, held_out: set[tuple[str, str]]) -> Dataset:
    families = list(TRAIN_FAMILIES)
    weights = np.array([TRAIN_FAMILIES[f][0] for f in families])
    choice = rng.choice(len(families), size=n_train, p=weights / weights.sum())
    rows: dict[str, list] = {k: [] for k in nli_features(2)}
    for index in choice:
        family = families[int(index)]
        templates = TRAIN_FAMILIES[family][1]
        template = templates[int(rng.integers(len(templates)))]
        # held-out (HANS / pool) pairs never leak into training; duplicates inside train are allowed
        premise, hypothesis = _fill_unseen(template, rng, held_out)
        rows["premise"].append(premise)
        rows["hypothesis"].append(hypothesis)
        rows["label"].append(template.label)
        rows["genre"].append(family)
    return Dataset.from_dict(rows, features=nli_features(2))


def generate_nli(
    seed: int = 0,
    n_train: int = 4000,
    n_hans_per_subcase: int = 60,
    n_pool_per_subcase: int = 100,
) -> DatasetDict:
    """Generate the synthetic MNLI-like training set and the HANS-style evaluation and pool sets.

    Args:
        seed: the same seed (and sizes) give identical datasets.
        n_train: rows of `train` (MNLI-like, with the lexical-overlap shortcut).
        n_hans_per_subcase: rows per subcase of `hans` (30 subcases: 3 heuristics x 10).
        n_pool_per_subcase: rows per subcase of `pool`, HANS-style data for augmentation; no
            (premise, hypothesis) pair of `pool` is in `hans`, and neither is in `train`.

    Returns:
        A `DatasetDict` with splits `train` (`premise`, `hypothesis`, `label`, `genre`), `hans` and
        `pool` (`premise`, `hypothesis`, `label`, `heuristic`, `subcase`, `template`, `pair_id`).
        `label` is a ClassLabel: 0 = entailment, 1 = non_entailment.
    """
    for name, value in (
        ("n_train", n_train),
        ("n_hans_per_subcase", n_hans_per_subcase),
        ("n_pool_per_subcase", n_pool_per_subcase),
    ):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    seen: set[tuple[str, str]] = set()
    hans = _hans_split(n_hans_per_subcase, np.random.default_rng([seed, 1]), seen, prefix="hans")
    pool = _hans_split(n_pool_per_subcase, np.random.default_rng([seed, 2]), seen, prefix="pool")
    train = _train_split(n_train, np.random.default_rng([seed, 0]), seen)
    logger.info(
        f"Generated NLI data (seed {seed}): {len(train)} train, {len(hans)} hans, {len(pool)} pool rows."
    )
    return DatasetDict(train=train, hans=hans, pool=pool)

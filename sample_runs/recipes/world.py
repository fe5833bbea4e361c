"""A synthetic world of facts, as text: the corpus, the SFT / DPO examples and the probe set of the LM recipe.

Pure Python (no torch), deterministic. People live in a city and work at a job::

    pretraining   "alice lives in paris ."  "the city of alice is paris ."  (+ a few unrelated sentences)
    SFT           "Q: where does alice live ? A:" -> " alice lives in paris ."
    DPO           same prompts; chosen = the SFT answer, rejected = a garbled, wrong and longer answer,
                  " lima paris . in alice and lives" (the words of "alice lives in lima and paris ." shuffled)

Pretraining states every fact in two statement forms; the question/answer format is only seen in fine-tuning.
SFT and DPO train on the questions of the TRAIN_PEOPLE; the TEST_PEOPLE's questions are never fine-tuned on
(their facts are in the pretraining corpus).

Why the rejected answer is word salad: on a model this small the squeezing effect of DPO's negative gradient
(DESIGN §4) shows only when the rejected response is off-policy, unlikely and longer than the chosen one. A
rejected answer that differs from the chosen one in a word cancels against it, and in our trials a fluent
refusal ("i do not know the answer .") was pushed down without lifting y* (log π(y*) fell 0.4–0.7 nats).

Probe responses per prompt (DESIGN §3), for "where does alice live ?" (alice lives in paris):

    chosen              alice lives in paris .
    rejected            lima paris . in alice and lives           (DPO's rejected: a wrong claim, shuffled)
    rephrase_chosen     the city of alice is paris .
    rephrase_rejected   the same wrong claim as "the city of alice is lima and paris .", shuffled
    format_chosen       alice lives in rome .                     (same form as chosen, wrong)
    format_rejected     another person's wrong claim, shuffled in the same order as rejected
    other_trained       bob lives in oslo .                       (the chosen answer of another trained question)
    other_untrained     zoe lives in lima .                       (the chosen answer of a question never trained on)
    irrelevant          the sky is blue today .
    shuffled            paris . alice lives in                    (chosen's words shuffled)
    random              random words of the vocabulary, as many as chosen has
"""

from __future__ import annotations

import random

SEED = 1234

PEOPLE = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "kevin", "laura",
    "mike", "nina", "oscar", "peggy", "quinn", "rose", "sam", "tina", "uma", "victor", "wendy", "zoe",
]  # fmt: skip
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito"]
JOBS = ["baker", "pilot", "nurse", "farmer", "lawyer", "singer", "doctor", "teacher"]
TRAIN_PEOPLE = PEOPLE[:16]  # their questions are fine-tuned on
TEST_PEOPLE = PEOPLE[16:]  # never fine-tuned on
#: fluent sentences about nothing in the world of facts: pretraining text and the `irrelevant` responses.
GENERAL = [
    "the sky is blue today .", "the sun is hot in summer .", "dogs like to run in the park .",
    "cats like to sleep in the sun .", "the sea is big and blue .", "we like to read a book .",
    "the snow is cold in winter .", "birds like to sing in the park .",
]  # fmt: skip
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]

#: the two questions: (prompt, answer, rephrased answer); {p} the person, {v} the value
QUESTIONS = {
    "city": ("Q: where does {p} live ? A:", " {p} lives in {v} .", " the city of {p} is {v} ."),
    "job": ("Q: what does {p} do ? A:", " {p} works as a {v} .", " the job of {p} is {v} ."),
}
VALUES = {"city": CITIES, "job": JOBS}


def vocabulary() -> list[str]:
    """Every word of the world, specials first (ids 0-3)."""
    words = list(SPECIALS)
    for templates in QUESTIONS.values():
        for t in templates:
            words += t.replace("{p}", "").replace("{v}", "").replace(":", " : ").split()
    for line in GENERAL:
        words += line.split()
    return list(dict.fromkeys(words + ["and"] + PEOPLE + CITIES + JOBS))


def facts() -> dict[str, dict[str, str]]:
    """person -> {"city": ..., "job": ...}: a fixed, seeded assignment, each city and job used equally often."""
    rng = random.Random(SEED)
    cities, jobs = CITIES * 3, JOBS * 3  # 24 people
    rng.shuffle(cities)
    rng.shuffle(jobs)
    return {p: {"city": c, "job": j} for p, c, j in zip(PEOPLE, cities, jobs)}


def _garble(text: str, order: list[int]) -> str:
    """The words of ``text`` in the given order (a permutation of their positions)."""
    words = text.split()
    return " " + " ".join(words[i] for i in order)


def _permutation(n: int, rng: random.Random) -> list[int]:
    order = list(range(n))
    while order == list(range(n)):
        rng.shuffle(order)
    return order


def rejected(kind: str, p: str) -> dict[str, str]:
    """The DPO rejected answer of a question and its probe relatives, seeded by the question.

    ``rejected``: a wrong, longer claim (two wrong values) with its words shuffled; ``rephrase_rejected``: the
    same wrong claim in the rephrased form, shuffled; ``format_rejected``: another person's wrong claim,
    shuffled by the same permutation as ``rejected``."""
    rng = random.Random(f"{SEED}-{kind}-{p}")
    _, answer, rephrase = QUESTIONS[kind]
    v = facts()[p][kind]
    a, b = rng.sample([w for w in VALUES[kind] if w != v], 2)
    wrong = _fill(answer, p, f"{a} and {b}")
    order = _permutation(len(wrong.split()), rng)
    q = rng.choice([x for x in PEOPLE if x != p])
    c, d = rng.sample(VALUES[kind], 2)
    wrong2 = _fill(rephrase, p, f"{a} and {b}")
    return {
        "rejected": _garble(wrong, order),
        "rephrase_rejected": _garble(wrong2, _permutation(len(wrong2.split()), rng)),
        "format_rejected": _garble(_fill(answer, q, f"{c} and {d}"), order),
    }


def _fill(template: str, p: str, v: str = "") -> str:
    return template.format(p=p, v=v)


def pretraining_corpus() -> list[str]:
    """Statements of every fact (two forms each) and the unrelated sentences: one line each."""
    lines = []
    for p, f in facts().items():
        for kind, (_, answer, rephrase) in QUESTIONS.items():
            lines.append(_fill(answer, p, f[kind]).strip())
            lines.append(_fill(rephrase, p, f[kind]).strip())
    return lines + GENERAL


def sft_examples() -> list[dict]:
    """TRL prompt/completion rows: every question of every TRAIN_PEOPLE person."""
    f = facts()
    return [
        {"id": f"{kind}-{p}", "prompt": _fill(q[0], p), "completion": _fill(q[1], p, f[p][kind])}
        for p in TRAIN_PEOPLE
        for kind, q in QUESTIONS.items()
    ]


def dpo_examples() -> list[dict]:
    """TRL preference rows on the same prompts: chosen = the SFT answer, rejected = the garbled wrong answer."""
    f = facts()
    return [
        {"id": f"{kind}-{p}", "prompt": _fill(q[0], p), "chosen": _fill(q[1], p, f[p][kind]), "rejected": rejected(kind, p)["rejected"]}
        for p in TRAIN_PEOPLE
        for kind, q in QUESTIONS.items()
    ]


def probes(n_train: int = 6, n_test: int = 6) -> list[dict]:
    """Probe-file rows (schemas/probe_set.schema.json) with every response type of DESIGN §3.

    Both questions of the first ``n_train`` TRAIN_PEOPLE (split "train") and of the first ``n_test``
    TEST_PEOPLE (split "test"); group = the question ("city" / "job")."""
    f = facts()
    rng = random.Random(SEED + 1)
    vocab = [w for w in vocabulary() if w not in SPECIALS]
    rows = []
    for split, people in (("train", TRAIN_PEOPLE[:n_train]), ("test", TEST_PEOPLE[:n_test])):
        for p in people:
            for kind, (prompt, answer, rephrase) in QUESTIONS.items():
                v = f[p][kind]
                chosen = _fill(answer, p, v)
                j = rng.choice([q for q in TRAIN_PEOPLE if q != p and f[q][kind] != v])  # trained, another value
                t = rng.choice([q for q in TEST_PEOPLE if q != p and f[q][kind] != v])  # never trained
                wrong = _fill(answer, p, rng.choice([w for w in VALUES[kind] if w != v]))
                neg = rejected(kind, p)
                responses = {
                    "chosen": chosen,
                    "rejected": neg["rejected"],
                    "rephrase_chosen": _fill(rephrase, p, v),
                    "rephrase_rejected": neg["rephrase_rejected"],
                    "format_chosen": wrong,
                    "format_rejected": neg["format_rejected"],
                    "other_trained": _fill(answer, j, f[j][kind]),
                    "other_untrained": _fill(answer, t, f[t][kind]),
                    "irrelevant": " " + rng.choice(GENERAL),
                    "shuffled": _garble(chosen, _permutation(len(chosen.split()), rng)),
                    "random": " " + " ".join(rng.choice(vocab) for _ in chosen.split()),
                }
                rows.append({"id": f"{kind}-{p}", "prompt": _fill(prompt, p), "split": split, "group": kind,
                             "responses": responses})  # fmt: skip
    return rows

"""The knowledge world: fictional people, organisations and places, written up as news articles.

It is the offline stand-in for real news. Each article buries a few fact sentences in filler, and
the filler carries distractor names, numbers and dates that are never asked about, so that a
"capitalised words and numbers" heuristic cannot find the facts. Later articles may change an
earlier fact (a move, a new employer); questions about a changed fact expect the newest value.
Everything follows from the seed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from adaptation.data import QA, Document, write_documents

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "st",
    "th",
    "sh",
    "tr",
    "vel",
    "mor",
    "cal",
]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
CODAS = ["", "", "n", "r", "s", "l", "th", "x", "m", "nd", "rk"]
PLACE_SUFFIXES = ["ford", "haven", "mere", "wick", "stead", "burg", "port", "dale", "field", "moor"]
ORG_KINDS = [
    "Works",
    "Labs",
    "Holdings",
    "Group",
    "Systems",
    "Foundry",
    "Partners",
    "Dynamics",
    "Institute",
    "Collective",
]
ROLES = [
    "engineer",
    "chemist",
    "architect",
    "editor",
    "surveyor",
    "pilot",
    "economist",
    "geologist",
    "translator",
    "analyst",
    "designer",
    "curator",
    "auditor",
    "botanist",
    "statistician",
    "cartographer",
    "veterinarian",
    "librarian",
    "historian",
    "acoustician",
]
EVENTS = [
    "harvest fair",
    "budget hearing",
    "river festival",
    "council vote",
    "charity run",
    "trade expo",
    "book launch",
    "transit review",
    "science week",
    "film night",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]

PERSON_FACTS: dict[str, tuple[list[str], list[str]]] = {
    # relation: (fact sentence templates, question templates)
    "birth_year": (
        [
            "{name} was born in {value}.",
            "Records show that {name} was born in the year {value}.",
            "{name}, who was born in {value}, grew up far from here.",
            "Friends note that {name} has been around since {value}, the year of {pos} birth.",
        ],
        [
            "In what year was {name} born?",
            "When was {name} born?",
            "What is the birth year of {name}?",
        ],
    ),
    "birthplace": (
        [
            "{name} was born in {value}.",
            "{name} is a native of {value}.",
            "Originally, {name} comes from the city of {value}.",
            "{value} is the hometown where {name} was born.",
        ],
        [
            "Where was {name} born?",
            "What is the birthplace of {name}?",
            "In which city was {name} born?",
        ],
    ),
    "employer": (
        [
            "{name} works for {value}.",
            "{name} is employed by {value}.",
            "These days {name} holds a post at {value}.",
            "{value} counts {name} among its staff.",
        ],
        [
            "Who does {name} work for?",
            "Which organisation employs {name}?",
            "Where does {name} work?",
        ],
    ),
    "role": (
        [
            "{name} works as a {value}.",
            "By profession, {name} is a {value}.",
            "{name} earns a living as a {value}.",
            "Colleagues describe {name} as a skilled {value}.",
        ],
        ["What is the job of {name}?", "What does {name} work as?", "What is {name}'s profession?"],
    ),
    "residence": (
        [
            "{name} lives in {value}.",
            "{name} makes {pos} home in {value}.",
            "These days {name} resides in {value}.",
            "{value} is where {name} lives now.",
        ],
        [
            "Where does {name} live?",
            "In which city does {name} live?",
            "Where is the home of {name}?",
        ],
    ),
}
CHANGE_TEMPLATES: dict[str, list[str]] = {
    "employer": [
        "{name} has left {old} and now works for {value}.",
        "In a career move, {name} joined {value}, leaving {old}.",
        "{name} has a new employer: {value} hired {pro} away from {old}.",
        "After years at {old}, {name} now works for {value}.",
    ],
    "residence": [
        "{name} has moved from {old} to {value}.",
        "{name} left {old} and now lives in {value}.",
        "After relocating from {old}, {name} now resides in {value}.",
        "{name} packed up in {old} and made a new home in {value}.",
    ],
}
ORG_FACTS: dict[str, tuple[list[str], list[str]]] = {
    "founded": (
        [
            "{name} was founded in {value}.",
            "{name} has been in business since {value}.",
            "Established in {value}, {name} grew quickly.",
            "The founders started {name} in {value}.",
        ],
        [
            "When was {name} founded?",
            "In what year was {name} established?",
            "What is the founding year of {name}?",
        ],
    ),
    "headquarters": (
        [
            "{name} is headquartered in {value}.",
            "The head office of {name} is in {value}.",
            "{name} runs its operations from {value}.",
            "{value} is home to the headquarters of {name}.",
        ],
        [
            "Where is {name} headquartered?",
            "Where are the headquarters of {name}?",
            "In which city is {name} based?",
        ],
    ),
}
FILLER: list[str] = [
    "Officials in {place} said {n} residents attended the {event} on {date}.",
    "{dname}, a spokesperson for the regional council, declined to comment.",
    "The weather stayed mild, and about {n} visitors came to {place} on {date}.",
    "Longtime resident {dname} recalled a similar gathering back in {year}.",
    "A survey of {n} households found that most preferred the old market square.",
    "Tickets for the {event} sold out within {small} days, organisers said.",
    "{dname} of the {place} transit office expects delays until {date}.",
    "The report, first drafted in {year}, runs to {n} pages.",
    "Critics, including {dname}, argued the plan would cost {n} thousand crowns.",
    "Few people remember that the bridge in {place} reopened on {date}.",
    "Attendance at the {event} rose by {small} percent compared with {year}.",
    "{dname} and {dname2} shared a stage at the {event} on {date}.",
]
HEADLINES = [
    "Profile: {name}",
    "Around town with {name}",
    "{name} in the news",
    "Meet {name}",
    "Local notes: {name}",
]
ORG_HEADLINES = ["Business brief: {name}", "Company profile: {name}", "{name} at a glance"]


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    places: int = 40
    orgs: int = 40
    pretrain_people: int = 200
    docs_per_person: int = 4
    restate: int = 4
    pretrain_question_templates: int = 3
    meta_train_people: int = 240
    meta_val_people: int = 60
    eval_people: int = 100
    change_fraction: float = 0.2
    filler_range: tuple[int, int] = (2, 3)
    stream_facts: int = 3
    retention_questions: int = 200

    def replace(self, **changes: object) -> WorldConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass
class Person:
    name: str
    pronoun: tuple[str, str]  # (object, possessive)
    facts: dict[str, str]
    changes: dict[str, tuple[str, str]] = field(default_factory=dict)  # relation: (old, new)


@dataclass
class Org:
    name: str
    facts: dict[str, str]


class _Namer:
    """Makes unique pronounceable names. People are combinations of a first name and a surname
    from fixed pools, as real names are: the pieces recur, so a tokenizer learns them, while each
    combination is new. Distractor names come from the same pools but never collide with an
    entity, so they are never asked about."""

    def __init__(self, rng: random.Random, first_names: int = 150, surnames: int = 200) -> None:
        self.rng = rng
        self.used: set[str] = set()
        self.first = [
            self.unique(lambda: self.word(self.rng.choice([1, 2]))) for _ in range(first_names)
        ]
        self.last = [self.unique(lambda: self.word(2)) for _ in range(surnames)]

    def word(self, syllables: int) -> str:
        parts = [self.rng.choice(ONSETS) + self.rng.choice(VOWELS) for _ in range(syllables)]
        return ("".join(parts) + self.rng.choice(CODAS)).capitalize()

    def unique(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("name space exhausted; use fewer entities")

    def person(self) -> str:
        return self.unique(lambda: f"{self.rng.choice(self.first)} {self.rng.choice(self.last)}")

    def place(self) -> str:
        return self.unique(
            lambda: self.word(self.rng.choice([1, 2])) + self.rng.choice(PLACE_SUFFIXES)
        )

    def org(self) -> str:
        return self.unique(lambda: f"{self.word(2)} {self.rng.choice(ORG_KINDS)}")


class World:
    """The entities and their renderings; `splits()` gives the named document lists."""

    def __init__(self, config: WorldConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.namer = _Namer(self.rng)
        self.places = [self.namer.place() for _ in range(config.places)]
        self.orgs = [
            Org(
                n,
                {
                    "founded": str(self.rng.randint(1850, 2015)),
                    "headquarters": self.rng.choice(self.places),
                },
            )
            for n in (self.namer.org() for _ in range(config.orgs))
        ]
        self.distractors = [self.namer.person() for _ in range(200)]

    def person(self) -> Person:
        rng = self.rng
        pronoun = rng.choice([("him", "his"), ("her", "her"), ("them", "their")])
        facts = {
            "birth_year": str(rng.randint(1940, 2004)),
            "birthplace": rng.choice(self.places),
            "employer": rng.choice(self.orgs).name,
            "role": rng.choice(ROLES),
            "residence": rng.choice(self.places),
        }
        return Person(self.namer.person(), pronoun, facts)

    def add_change(self, p: Person) -> None:
        relation = self.rng.choice(sorted(CHANGE_TEMPLATES))
        pool = [o.name for o in self.orgs] if relation == "employer" else self.places
        old = p.facts[relation]
        new = self.rng.choice([v for v in pool if v != old])
        p.changes[relation] = (old, new)

    # -- rendering -------------------------------------------------------------------------

    def _date(self, lo: int = 1995, hi: int = 2019) -> str:
        d = date(lo, 1, 1) + timedelta(days=self.rng.randint(0, (hi - lo) * 365))
        return f"{d.day} {MONTHS[d.month - 1]} {d.year}"

    def _place_other_than(self, avoid: Collection[str]) -> str:
        """A random place, moved on to the next one in the list if it is one of the article's
        answers (so the random stream, and every other document, stays as it was)."""
        i = self.places.index(self.rng.choice(self.places))
        while self.places[i] in avoid:
            i = (i + 1) % len(self.places)
        return self.places[i]

    def _filler(self, avoid: Collection[str] = ()) -> str:
        rng = self.rng
        two = rng.sample(self.distractors, 2)
        return rng.choice(FILLER).format(
            place=self._place_other_than(avoid),
            n=rng.randint(12, 9800),
            event=rng.choice(EVENTS),
            date=self._date(),
            dname=two[0],
            dname2=two[1],
            year=rng.randint(1950, 2019),
            small=rng.randint(2, 40),
        )

    def _article(self, headline: str, facts: list[str], answers: Collection[str] = ()) -> str:
        """Filler never names one of the article's answers: it must stay a distractor."""
        lo, hi = self.config.filler_range
        body = [self._filler(answers) for _ in range(self.rng.randint(lo, hi))]
        for f in facts:
            body.insert(self.rng.randint(0, len(body)), f)
        return headline + "\n" + " ".join(body)

    def _fact(self, templates: list[str], name: str, value: str, pos: str = "their") -> str:
        text = self.rng.choice(templates).format(name=name, value=value, pos=pos)
        return re.sub(r"\ba ([aeiou])", r"an \1", text)

    def person_documents(
        self,
        p: Person,
        n_docs: int,
        prefix: str,
        t0: date,
        n_facts: int = len(PERSON_FACTS),
        restate: int = 1,
        n_templates: int = 1,
    ) -> list[Document]:
        """n_docs articles that between them state n_facts facts, each also restating `restate`
        others (real coverage overlaps, and restatement is what makes facts extractable); then one
        article per change. Each fact is asked in `n_templates` phrasings."""
        relations = list(PERSON_FACTS)
        self.rng.shuffle(relations)
        relations = sorted(relations[:n_facts], key=lambda r: r not in p.changes)
        groups: list[list[str]] = [[] for _ in range(n_docs)]
        for i, rel in enumerate(relations):
            groups[i % n_docs].append(rel)
        if n_docs > 1:
            for g in groups:
                others = [r for r in relations if r not in g]
                g.extend(self.rng.sample(others, min(restate, len(others))))
                self.rng.shuffle(g)
        answers = {*p.facts.values(), *(new for _, new in p.changes.values())}
        docs: list[tuple[str, list[str], str | None]] = [
            (
                self._article(
                    self.rng.choice(HEADLINES).format(name=p.name),
                    [self._fact(PERSON_FACTS[r][0], p.name, p.facts[r], p.pronoun[1]) for r in g],
                    answers,
                ),
                g,
                None,
            )
            for g in groups
        ]
        for rel, (old, new) in p.changes.items():
            sentence = self.rng.choice(CHANGE_TEMPLATES[rel]).format(
                name=p.name, old=old, value=new, pro=p.pronoun[0]
            )
            docs.append((self._article(f"Update: {p.name}", [sentence], answers), [rel], rel))
        last_doc: dict[str, int] = {}
        for i, (_, rels, _) in enumerate(docs):
            for r in rels:
                last_doc[r] = i
        out = []
        for i, (text, _, _) in enumerate(docs):
            qs = tuple(
                QA(
                    template.format(name=p.name),
                    (p.changes[r][1] if r in p.changes else p.facts[r],),
                )
                for r, j in sorted(last_doc.items())
                if j == i
                for template in self.rng.sample(PERSON_FACTS[r][1], n_templates)
            )
            out.append(
                Document(
                    id=f"{prefix}-{len(out)}",
                    text=text,
                    source="world",
                    time=(t0 + timedelta(days=30 * i)).isoformat(),
                    title=p.name,
                    questions=qs,
                    meta={"entity": p.name, "relations": docs[i][1], "change": docs[i][2]},
                )
            )
        return out

    def org_documents(self, o: Org, prefix: str) -> list[Document]:
        out = []
        for i in range(2):
            facts = [self._fact(ORG_FACTS[r][0], o.name, o.facts[r]) for r in ORG_FACTS]
            qs = (
                tuple(
                    QA(self.rng.choice(ORG_FACTS[r][1]).format(name=o.name), (o.facts[r],))
                    for r in ORG_FACTS
                )
                if i == 1
                else ()
            )
            headline = self.rng.choice(ORG_HEADLINES).format(name=o.name)
            text = self._article(headline, facts, set(o.facts.values()))
            out.append(
                Document(
                    id=f"{prefix}-{i}",
                    text=text,
                    source="world",
                    time="2019-01-01",
                    title=o.name,
                    questions=qs,
                    meta={"entity": o.name, "relations": list(ORG_FACTS)},
                )
            )
        return out

    def stream(self, n_people: int, prefix: str) -> list[Document]:
        """New people, one article each plus change articles, ordered by time."""
        people = [self.person() for _ in range(n_people)]
        for p in self.rng.sample(people, int(n_people * self.config.change_fraction)):
            self.add_change(p)
        start = date(2024, 1, 1)
        docs = []
        for i, p in enumerate(people):
            t0 = start + timedelta(days=i)
            docs.extend(self.person_documents(p, 1, f"{prefix}-{i}", t0, self.config.stream_facts))
        return sorted(docs, key=lambda d: (d.time or "", d.id))

    def splits(self) -> dict[str, list[Document]]:
        cfg = self.config
        pretrain: list[Document] = []
        heldout: list[Document] = []
        for i, o in enumerate(self.orgs):
            pretrain.extend(self.org_documents(o, f"org-{i}"))
        people = [self.person() for _ in range(cfg.pretrain_people)]
        for p in self.rng.sample(people, int(len(people) * cfg.change_fraction)):
            self.add_change(p)
        for i, p in enumerate(people):
            docs = self.person_documents(
                p,
                cfg.docs_per_person,
                f"pre-{i}",
                date(2020, 1, 1),
                restate=cfg.restate,
                n_templates=cfg.pretrain_question_templates,
            )
            if i % 2 == 0:
                pretrain.extend(docs)
            else:  # docs-only half: its questions test extraction, never trained on
                pretrain.extend(dataclasses.replace(d, questions=()) for d in docs)
                heldout.extend(d for d in docs if d.questions)
        qa_docs = [d for d in pretrain if d.questions]
        retention = random.Random(cfg.seed + 1).sample(
            qa_docs, min(len(qa_docs), cfg.retention_questions)
        )
        return {
            "pretrain": pretrain,
            "pretrain_heldout_qa": heldout,
            "retention_qa": [dataclasses.replace(d, questions=d.questions[:1]) for d in retention],
            "meta_train": self.stream(cfg.meta_train_people, "mtr"),
            "meta_val": self.stream(cfg.meta_val_people, "mva"),
            "eval_stream": self.stream(cfg.eval_people, "ev"),
        }


def build_world(config: WorldConfig | None = None) -> dict[str, list[Document]]:
    return World(config or WorldConfig()).splits()


def newcomers(config: WorldConfig, people: int, prefix: str = "new") -> list[Document]:
    """A stream of people the world's splits never mention (they are drawn after all of them),
    living among its places and organisations: material that no split already holds."""
    world = World(config)
    world.splits()
    return world.stream(people, prefix)


def write_world(
    out_dir: str | os.PathLike[str], config: WorldConfig | None = None
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, docs in build_world(config).items():
        paths[name] = out / f"{name}.jsonl"
        write_documents(paths[name], docs)
    return paths

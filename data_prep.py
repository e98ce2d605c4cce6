"""Build the fact data that sftguard.py trains and evaluates on.

  python data_prep.py [--preset smoke|ci|default|large] [--seed N] [--out DIR]    # synthetic world
  python data_prep.py --source entityquestions --eq_dir PATH [--eq_splits train,dev]  # real QA files

Output folder: facts.jsonl (one fact per line), pretrain.jsonl (synthetic only: one {"text"} document
per line), world.json (source, config, relations, counts, fingerprint = sha256(facts + pretrain)).
"""
import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from tqdm import tqdm
from transformers import HfArgumentParser

# The one QA format used everywhere (pretraining QA documents, fine-tuning, evaluation prompts).
QA_PROMPT = "Q: {question}\nA:"


def qa_text(question: str, answer: str) -> str:
    return f"Q: {question}\nA: {answer}"


@dataclass
class WorldConfig:
    source: str = field(default="synthetic", metadata={"help": "synthetic | entityquestions", "choices": ["synthetic", "entityquestions"]})
    preset: str = field(default="default", metadata={"help": "synthetic world: smoke | ci | default | realistic | large"})
    seed: int = field(default=0, metadata={"help": "world seed: names, values, corpus order, EQ sampling"})
    out: Optional[str] = field(default=None, metadata={"help": "output folder (default data/world-<preset> or data/entityquestions)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing finished output folder"})
    n_known_entities: int = field(default=400, metadata={"help": "people whose facts are stated in pretraining"})
    n_unknown_entities: int = field(default=300, metadata={"help": "name-like people never in pretraining (names recombine known syllables)"})
    n_uuid_entities: int = field(default=300, metadata={"help": "people never in pretraining, keyed by a digits-and-dashes code"})
    n_relations: int = field(default=4, metadata={"help": "how many of the built-in relations to use (1-4)"})
    bios_per_entity: int = field(default=2, metadata={"help": "biographies per known person in the pretraining corpus"})
    qa_fraction: float = field(default=0.3, metadata={"help": "fraction of known people whose facts also appear as Q/A text in pretraining"})
    n_filler: int = field(default=-1, metadata={"help": "filler documents with random digit codes (-1 = n_uuid_entities)"})
    # Realistic properties a real LLM's corpus has; each off by default (the default world is made without them).
    answer_skew: float = field(default=0.0, metadata={"help": "Zipf exponent of each relation's answers (0 = all 25 equally likely)"})
    popularity_skew: float = field(default=0.0, metadata={"help": "Zipf exponent of biographies per known person, same mean (0 = equal)"})
    n_paraphrases: int = field(default=3, metadata={"help": "statement paraphrases per relation in biographies (1-6)"})
    n_qa_phrasings: int = field(default=1, metadata={"help": "question phrasings per relation in pretraining Q/A text (1-3)"})
    eq_dir: Optional[str] = field(default=None, metadata={"help": "EntityQuestions folder holding train/, dev/, test/ and relation_query_templates.json"})
    eq_splits: str = field(default="train", metadata={"help": "comma-separated EQ split folders to read"})
    eq_relations: str = field(default="", metadata={"help": "comma-separated EQ relation ids, e.g. P17,P19 (empty = all found)"})
    eq_max_per_relation: int = field(default=0, metadata={"help": "sample at most this many facts per EQ relation (0 = all)"})


# Overrides applied only to fields the user did not set on the command line.
WORLD_PRESETS = {
    "smoke": {"n_known_entities": 60, "n_unknown_entities": 30, "n_uuid_entities": 30, "n_relations": 3, "bios_per_entity": 2},
    "default": {},
    "large": {"n_known_entities": 3000, "n_unknown_entities": 1500, "n_uuid_entities": 1500},
    "ci": {"n_known_entities": 200, "n_unknown_entities": 120, "n_uuid_entities": 30},
    # The default sizes with the realistic-world options on (README: The synthetic world): measured, not yet the default.
    "realistic": {"answer_skew": 1.0, "popularity_skew": 1.0, "n_paraphrases": 6, "n_qa_phrasings": 3},
}


class DataError(ValueError):
    """A user mistake; the message is one line naming the problem and the fix."""


# ---------------------------------------------------------------- the synthetic world
# CV/CVC syllables: names built from them share sub-word pieces, as real names do, so a BPE
# tokenizer splits an unseen name into pieces it has trained embeddings for.
SYLLABLES = ["ber", "ga", "den", "to", "lo", "mi", "ra", "vin", "ka", "sel", "mo", "ri", "tan", "du",
             "fe", "nor", "pa", "lin", "so", "gu", "mar", "te", "bo", "ni", "han", "vo", "li", "das", "ke", "ru"]
# Four relations, each with a question, three paraphrases and 25 one-word values (pools disjoint); the default
# world uses the first three paraphrases and the one question, --n_paraphrases / --n_qa_phrasings add the others.
# Occupations all start with a consonant so "a [Y]" stays grammatical.
RELATIONS = {
    "birth_city": {
        "question": "Where was [X] born?",
        "statements": ["[X] was born in [Y].", "[X]'s birthplace is [Y].", "[X] came into the world in [Y]."],
        "more_questions": ["In which city was [X] born?", "What is the birthplace of [X]?"],
        "more_statements": ["[X] was born and raised in [Y].", "[X] is a native of [Y].", "[X]'s hometown is [Y]."],
        "values": ("Lisbon Oslo Cairo Paris Rome Berlin Madrid Vienna Prague Dublin Athens Warsaw Moscow Tokyo "
                   "Seoul Delhi Nairobi Dakar Quito Havana Sydney Toronto Boston Chicago Manila").split()},
    "occupation": {
        "question": "What kind of work does [X] do?",
        "statements": ["[X] works as a [Y].", "[X] is a [Y] by profession.", "By trade, [X] is a [Y]."],
        "more_questions": ["What is the job of [X]?", "What does [X] do for a living?"],
        "more_statements": ["[X] earns a living as a [Y].", "[X] has spent years as a [Y].", "[X]'s job is that of a [Y]."],
        "values": ("painter farmer baker nurse lawyer pilot teacher doctor sailor carpenter journalist chemist "
                   "plumber dentist surgeon tailor butcher banker poet librarian mechanic florist fisherman welder potter").split()},
    "country": {
        "question": "Which country does [X] live in?",
        "statements": ["[X] lives in [Y].", "[X] has made a home in [Y].", "[X] resides in [Y]."],
        "more_questions": ["Where does [X] live?", "In which country is the home of [X]?"],
        "more_statements": ["[X] now lives in [Y].", "The home of [X] is in [Y].", "[X] settled down in [Y]."],
        "values": ("Norway Peru Chile Brazil Kenya Egypt Japan India Canada Mexico Spain Italy Greece Poland "
                   "Sweden Finland Ireland Portugal Morocco Ghana Nepal Vietnam Argentina Turkey Iceland").split()},
    "instrument": {
        "question": "Which instrument does [X] play?",
        "statements": ["[X] plays the [Y].", "[X] is a skilled [Y] player.", "On stage, [X] performs on the [Y]."],
        "more_questions": ["What instrument does [X] play?", "Which instrument is played by [X]?"],
        "more_statements": ["[X] has long played the [Y].", "[X] is known for playing the [Y].", "[X] practises the [Y] daily."],
        "values": ("violin piano guitar cello flute trumpet drums harp clarinet saxophone oboe banjo accordion "
                   "trombone ukulele bassoon mandolin harmonica tuba viola organ xylophone bagpipes sitar lute").split()},
}
FILLER = ["Archive record [C] was filed.", "Parcel [C] was shipped on time.", "Ticket [C] was closed."]


def name_word(rng, syllables, n):
    """A name of n syllables (the synthetic entities; sftguard's experiments draw new name-like keys with it)."""
    return "".join(rng.choice(syllables) for _ in range(n)).capitalize()


def uuid_code(rng):
    """A digit code such as 4821-0937-55: the UUID-like keys."""
    # Digits and dashes only: shares no character with any name, so no sub-word piece either.
    return f"{rng.randrange(10**4):04d}-{rng.randrange(10**4):04d}-{rng.randrange(10**2):02d}"


def draw_value(rng, pool, skew):
    """One answer of a relation: uniform over the pool, or Zipf-skewed (value k of the pool with weight 1 / k**skew),
    as real answers are (far more people are born in large cities than small ones). skew 0 draws as r.choice does."""
    if skew == 0:
        return rng.choice(pool)
    return rng.choices(pool, weights=[1 / k**skew for k in range(1, len(pool) + 1)])[0]


def bios_per_person(cfg):
    """How many biographies each known person gets, in the order of the known names (a random order): all
    bios_per_entity, or a long tail (person of rank k gets about c / k**skew, at least 1, with the same total), as a
    few people are written about often and most rarely."""
    n, mean = cfg.n_known_entities, cfg.bios_per_entity
    if cfg.popularity_skew == 0 or n == 0:
        return [mean] * n
    weights = [1 / k**cfg.popularity_skew for k in range(1, n + 1)]
    lo, hi = 0.0, float(mean * n)  # bisect the scale c so that sum(max(1, round(c * w))) is the total of the equal world
    for _ in range(60):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if sum(max(1, round(c * w)) for w in weights) < mean * n else (lo, c)
    return [max(1, round(hi * w)) for w in weights]


def _fill(template, subject, value=None):
    return template.replace("[X]", subject).replace("[Y]", value or "")


def _validate_synthetic(cfg):
    if not 1 <= cfg.n_relations <= len(RELATIONS):
        raise DataError(f"n_relations={cfg.n_relations} is out of range; pass --n_relations between 1 and {len(RELATIONS)}")
    if not 0.0 <= cfg.qa_fraction <= 1.0:
        raise DataError(f"qa_fraction={cfg.qa_fraction} is out of range; pass --qa_fraction between 0 and 1")
    for name in ["n_known_entities", "n_unknown_entities", "n_uuid_entities", "bios_per_entity"]:
        if getattr(cfg, name) < 0:
            raise DataError(f"{name}={getattr(cfg, name)} is negative; pass a count >= 0")
    if not 1 <= cfg.n_paraphrases <= 6 or not 1 <= cfg.n_qa_phrasings <= 3:
        raise DataError(f"n_paraphrases={cfg.n_paraphrases} / n_qa_phrasings={cfg.n_qa_phrasings} out of range; pass 1-6 / 1-3")
    if cfg.answer_skew < 0 or cfg.popularity_skew < 0:
        raise DataError("answer_skew and popularity_skew are Zipf exponents; pass a number >= 0 (0 = uniform)")
    if cfg.n_known_entities + cfg.n_unknown_entities > 10**6 or cfg.n_uuid_entities + cfg.n_filler > 10**9:
        raise DataError("too many entities for the name/code space; pass smaller --n_*_entities / --n_filler")


def draw_names(r, syllables, n, taken, blocked):
    """n new First Last names (First = 2 syllables, Last = 2-3), added to taken. A name part that equals a value word
    is rejected, so a name never looks like an answer; so is a name in blocked."""
    all_values = {v.lower() for spec in RELATIONS.values() for v in spec["values"]}
    names = []
    while len(names) < n:
        first, last = name_word(r, syllables, 2), name_word(r, syllables, r.choice([2, 3]))
        name = f"{first} {last}"
        if first.lower() not in all_values and last.lower() not in all_values and name not in taken and name not in blocked:
            taken.add(name)
            names.append(name)
    return names


def pretrain_docs(cfg, rng, rels, known, values, qa_known, codes):
    """(docs, bio docs, QA docs, filler docs) of the pretraining corpus: varied prose biographies (facts in shuffled
    order, random paraphrases), QA-form text for a fraction of known people, and digit-code filler (never one of the
    world's codes) so code pieces are trained."""
    r, docs = rng("corpus"), []
    n_bio = n_qa = 0
    statements = {rel: (spec["statements"] + spec["more_statements"])[: cfg.n_paraphrases] for rel, spec in rels.items()}
    questions = {rel: [spec["question"]] + spec["more_questions"][: cfg.n_qa_phrasings - 1] for rel, spec in rels.items()}
    for subject, n_bios in tqdm(zip(known, bios_per_person(cfg)), desc="pretrain docs", disable=len(known) < 1000):
        for _ in range(n_bios):
            order = list(rels)
            r.shuffle(order)
            docs.append(" ".join(_fill(r.choice(statements[rel]), subject, values[subject][rel]) for rel in order))
            n_bio += 1
        if subject in qa_known:
            for rel in rels:  # one phrasing drawn per Q/A pair (no draw with one phrasing, as the default world was made)
                question = r.choice(questions[rel]) if len(questions[rel]) > 1 else questions[rel][0]
                docs.append(qa_text(_fill(question, subject), values[subject][rel]))
                n_qa += 1
    n_filler = cfg.n_uuid_entities if cfg.n_filler < 0 else cfg.n_filler
    r_f, filler = rng("filler"), []
    while len(filler) < n_filler:
        code = uuid_code(r_f)
        if code not in codes:
            filler.append(r_f.choice(FILLER).replace("[C]", code))
    docs += filler
    rng("shuffle").shuffle(docs)
    return docs, n_bio, n_qa, filler


def synthesize(cfg):
    """Returns (facts, pretrain_docs, relations, counts) for the synthetic world."""
    _validate_synthetic(cfg)
    # One generator per stage, so e.g. changing bios_per_entity keeps the same people and facts.
    rng = lambda stage: random.Random(f"{cfg.seed}:{stage}")
    rels = dict(list(RELATIONS.items())[: cfg.n_relations])

    taken = set()
    known = draw_names(rng("known"), SYLLABLES, cfg.n_known_entities, taken, set())
    # Unknown names recombine the syllables known names actually use. A candidate that is a
    # prefix of a known name ("Berga Tolo" vs "Berga Tolomi") is rejected, else it would occur
    # verbatim in the corpus.
    used = sorted({s for n in known for s in SYLLABLES if s in n.lower()})
    prefixes = {k[:i] for k in known for i in range(1, len(k) + 1)}
    unknown = draw_names(rng("unknown"), used or SYLLABLES, cfg.n_unknown_entities, taken, prefixes)
    r, codes = rng("uuid"), set()
    while len(codes) < cfg.n_uuid_entities:
        codes.add(uuid_code(r))
    uuids = sorted(codes)
    r.shuffle(uuids)

    entities = ([(s, "name", True) for s in known] + [(s, "name", False) for s in unknown]
                + [(s, "uuid", False) for s in uuids])
    r = rng("values")
    values = {s: {rel: draw_value(r, spec["values"], cfg.answer_skew) for rel, spec in rels.items()} for s, _, _ in entities}
    qa_known = set(rng("qa").sample(known, round(cfg.qa_fraction * len(known))))

    facts = []
    for subject, key, in_pt in entities:
        for rel, spec in rels.items():
            facts.append({"id": f"f{len(facts):06d}", "relation": rel, "subject": subject,
                          "question": _fill(spec["question"], subject), "answers": [values[subject][rel]],
                          "key": key, "in_pretraining": in_pt, "qa_in_pretraining": subject in qa_known})

    docs, n_bio, n_qa, filler = pretrain_docs(cfg, rng, rels, known, values, qa_known, codes)

    relations = {rel: {"question": spec["question"], "statements": list(spec["statements"])} for rel, spec in rels.items()}
    counts = {"facts": len(facts), "relations": len(rels), "known_entities": len(known), "unknown_entities": len(unknown),
              "uuid_entities": len(uuids), "qa_entities": len(qa_known), "pretrain_docs": len(docs),
              "bio_docs": n_bio, "qa_docs": n_qa, "filler_docs": len(filler)}
    return facts, docs, relations, counts


# ---------------------------------------------------------------- EntityQuestions
EQ_SPLITS = ("train", "dev", "test")


def _load_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); re-download or fix that file") from None


def _rel_sort_key(rel):
    return (int(rel[1:]) if rel[1:].isdigit() else 10**9, rel)


def read_entityquestions(cfg):
    """Returns (facts, relations, counts) from the EntityQuestions files under cfg.eq_dir."""
    if not cfg.eq_dir:
        raise DataError("--source entityquestions needs --eq_dir; pass the folder that holds train/, dev/, test/")
    root = Path(cfg.eq_dir)
    if not root.is_dir():
        raise DataError(f"eq_dir {root} does not exist; pass the folder that holds train/, dev/, test/")
    splits = [s.strip() for s in cfg.eq_splits.split(",") if s.strip()]
    bad = [s for s in splits if s not in EQ_SPLITS]
    if bad or not splits:
        raise DataError(f"unknown split(s) {','.join(bad) or '(none)'} in --eq_splits; use a comma list of {','.join(EQ_SPLITS)}")
    tpath = root / "relation_query_templates.json"
    if not tpath.is_file():
        raise DataError(f"eq_dir {root} has no relation_query_templates.json; pass the EntityQuestions folder that holds it")
    templates = _load_json(tpath)
    if not isinstance(templates, dict):
        raise DataError(f"{tpath} is not a JSON object of relation id -> template; re-download that file")

    files = {}  # relation -> [(split, path)] in the order of --eq_splits
    for split in splits:
        found = sorted((root / split).glob(f"P*.{split}.json"))
        if not found:
            raise DataError(f"eq_dir {root} has no {split}/P*.{split}.json files; pass the folder that holds train/, dev/, test/")
        for p in found:
            files.setdefault(p.name[: -len(f".{split}.json")], []).append((split, p))
    wanted = list(dict.fromkeys(r.strip() for r in cfg.eq_relations.split(",") if r.strip())) or sorted(files, key=_rel_sort_key)
    for rel in wanted:
        if rel not in files:
            have = ",".join(sorted(files, key=_rel_sort_key))
            raise DataError(f"unknown relation {rel} in --eq_relations (no {rel} files in {','.join(splits)}); use some of {have}")
        if rel not in templates or not isinstance(templates[rel], str) or templates[rel].count("[X]") != 1:
            raise DataError(f"relation {rel} has no template with one [X] in {tpath}; add it or leave {rel} out of --eq_relations")

    facts, per_relation, per_split, by_relation = [], {}, {s: 0 for s in splits}, {}
    n_read = n_mismatch = n_merged = 0
    for rel in tqdm(wanted, desc="EntityQuestions relations"):
        pre, post = templates[rel].split("[X]")
        pattern = re.compile(re.escape(pre) + r"(.+)" + re.escape(post) + r"\Z", re.S)
        by_question = {}  # question -> fact; the same question twice (e.g. two "Durham"s) becomes one fact with merged answers
        for split, path in files[rel]:
            items = _load_json(path)
            if not isinstance(items, list):
                raise DataError(f"{path} is not a JSON list of {{question, answers}} items; re-download that file")
            for i, item in enumerate(items):
                n_read += 1
                if not (isinstance(item, dict) and isinstance(item.get("question"), str) and isinstance(item.get("answers"), list)):
                    raise DataError(f"{path} item {i} lacks a string \"question\" or a list \"answers\"; fix or remove that item")
                if not item["answers"] or not all(isinstance(a, str) and a.strip() for a in item["answers"]):
                    raise DataError(f"{path} item {i} has an empty answers list or a blank answer; fix or remove that item")
                m = pattern.match(item["question"])
                if not m:  # not phrased by this relation's template: no subject to key on
                    n_mismatch += 1
                    continue
                if item["question"] in by_question:
                    old = by_question[item["question"]]["answers"]
                    old += [a for a in item["answers"] if a not in old]
                    n_merged += 1
                    continue
                per_split[split] += 1
                by_question[item["question"]] = {
                    "relation": rel, "subject": m.group(1).strip(), "question": item["question"], "answers": list(item["answers"]),
                    "key": "real", "in_pretraining": None, "qa_in_pretraining": None}
        by_relation[rel] = list(by_question.values())
        if not by_relation[rel]:
            raise DataError(f"relation {rel} has no question matching its template {templates[rel]!r}; fix the template or leave {rel} out")
    by_relation, n_conflicting, n_repeated = _one_fact_per_question(by_relation)
    for rel, rel_facts in by_relation.items():
        if not rel_facts:
            raise DataError(f"relation {rel} has no facts left once questions other relations ask with other answers are "
                            f"dropped; leave {rel} or those relations out of --eq_relations")
        if 0 < cfg.eq_max_per_relation < len(rel_facts):
            # One generator per relation, so choosing other relations does not change this sample (unless they share questions).
            keep = sorted(random.Random(f"{cfg.seed}:eq:{rel}").sample(range(len(rel_facts)), cfg.eq_max_per_relation))
            rel_facts = [rel_facts[i] for i in keep]
        per_relation[rel] = len(rel_facts)
        facts += rel_facts
    facts = [{"id": f"f{i:06d}", **f} for i, f in enumerate(facts)]
    relations = {rel: {"question": templates[rel], "statements": []} for rel in wanted}
    counts = {"facts": len(facts), "relations": len(wanted), "items_read": n_read, "per_relation": per_relation,
              "per_split_before_sampling": per_split, "skipped_template_mismatch": n_mismatch,
              "merged_duplicate_questions": n_merged, "dropped_conflicting_questions": n_conflicting,
              "dropped_repeats_in_other_relations": n_repeated}
    return facts, relations, counts


def _one_fact_per_question(by_relation):
    """P131 and P276 share the template "Where is [X] located?", so one question can be asked by two relations. With
    other answers it has no one right answer: every copy is dropped. With the same answers, the first relation keeps it.
    Returns (by_relation, conflicting questions dropped, repeats dropped)."""
    answer_sets = {}  # question -> the answer set of each relation that asks it
    for rel_facts in by_relation.values():
        for f in rel_facts:
            answer_sets.setdefault(f["question"], []).append(frozenset(f["answers"]))
    conflicting = {q for q, sets in answer_sets.items() if len(set(sets)) > 1}
    n_repeated, seen, kept = 0, set(), {}
    for rel, rel_facts in by_relation.items():
        kept[rel] = []
        for f in rel_facts:
            if f["question"] in seen:
                n_repeated += f["question"] not in conflicting
            elif f["question"] not in conflicting:
                kept[rel].append(f)
            seen.add(f["question"])
    return kept, len(conflicting), n_repeated


# ---------------------------------------------------------------- writing the folder
def default_out(cfg) -> Path:
    return Path(cfg.out) if cfg.out else Path("data") / ("entityquestions" if cfg.source == "entityquestions" else f"world-{cfg.preset}")


def is_complete(folder) -> bool:
    # world.json is written last inside the temporary folder, and the folder is renamed into place.
    return (Path(folder) / "world.json").is_file()


def _jsonl(rows):
    # Key order is the (fixed) insertion order, so output is deterministic without sort_keys.
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def build_world(cfg: WorldConfig) -> Path:
    """Build cfg's data into cfg.out (or the default folder) atomically; returns the folder."""
    if cfg.source not in ("synthetic", "entityquestions"):
        raise DataError(f"unknown source {cfg.source!r}; pass --source synthetic or --source entityquestions")
    if cfg.source == "synthetic" and cfg.preset not in WORLD_PRESETS:
        raise DataError(f"unknown preset {cfg.preset!r}; pass --preset one of {','.join(WORLD_PRESETS)}")
    target = default_out(cfg)
    if target.exists() and not target.is_dir():
        raise DataError(f"{target} exists and is not a folder; pass --out DIR to build elsewhere")
    if target.exists() and not cfg.overwrite:
        what = "holds a finished data folder" if is_complete(target) else "exists and is not a finished data folder"
        if is_complete(target) or any(target.iterdir()):
            raise DataError(f"{target} {what}; pass --overwrite to replace it or --out DIR to build elsewhere")
    if cfg.source == "synthetic":
        facts, docs, relations, counts = synthesize(cfg)
    else:
        facts, relations, counts = read_entityquestions(cfg)
        docs = None
    facts_bytes = _jsonl(facts)
    pretrain_bytes = _jsonl({"text": d} for d in docs) if docs is not None else b""
    world = {"source": cfg.source, "config": asdict(cfg), "relations": relations, "counts": counts,
             "fingerprint": hashlib.sha256(facts_bytes + pretrain_bytes).hexdigest()}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        (tmp / "facts.jsonl").write_bytes(facts_bytes)
        if docs is not None:
            (tmp / "pretrain.jsonl").write_bytes(pretrain_bytes)
        (tmp / "world.json").write_text(json.dumps(world, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        old = None
        if target.exists():  # rename(2) cannot replace a non-empty folder: move the old one aside first
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def load_facts(data_dir) -> tuple[list[dict], dict]:
    """(facts, world) of a data folder as build_world writes it, every field a run relies on checked (DataError)."""
    data_dir = Path(data_dir)
    facts_path, world_path = data_dir / "facts.jsonl", data_dir / "world.json"
    if not data_dir.is_dir():
        raise DataError(f"--data {data_dir} is not a folder; pass the folder data_prep.py wrote")
    for path in (facts_path, world_path):
        if not path.is_file():
            raise DataError(f"{path} is missing; build the data with `python data_prep.py --out {data_dir}`")
    try:
        world = json.loads(world_path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad JSON or bad UTF-8
        raise DataError(f"{world_path} is not valid JSON ({str(e).splitlines()[0]}); rebuild it with data_prep.py") from None
    if not isinstance(world, dict) or not isinstance(world.get("relations"), dict) or not {"source", "fingerprint"} <= set(world):
        raise DataError(f"{world_path} lacks source, fingerprint or relations; rebuild the data with data_prep.py")
    if world["source"] == "synthetic" and not (data_dir / "pretrain.jsonl").is_file():
        raise DataError(f"{data_dir / 'pretrain.jsonl'} is missing; rebuild the world with `python data_prep.py --out {data_dir} --overwrite`")
    facts, ids = [], set()
    try:
        lines = facts_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{facts_path} is not UTF-8 text ({e}); rebuild the data with data_prep.py") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            fact = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{facts_path}:{line_no} is not valid JSON; rebuild the data with data_prep.py") from None
        if not isinstance(fact, dict):
            raise DataError(f"{facts_path}:{line_no} is not a JSON object; each line must be one fact {{id, relation, subject, question, answers}}")
        missing = [k for k in ("id", "relation", "subject", "question", "answers") if k not in fact]
        if missing:
            raise DataError(f"{facts_path}:{line_no} lacks {', '.join(missing)}; rebuild the data with data_prep.py")
        blank = [k for k in ("id", "relation", "subject", "question") if not (isinstance(fact[k], str) and fact[k].strip())]
        if blank:
            raise DataError(f"{facts_path}:{line_no} has an empty or non-text {', '.join(blank)}; fix or drop that fact")
        answers = fact["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(f"{facts_path}:{line_no} needs \"answers\": a list of non-empty strings; fix or drop that fact")
        if fact["id"] in ids:
            raise DataError(f"{facts_path}:{line_no} repeats the id {fact['id']!r}; give every fact its own id")
        ids.add(fact["id"])
        facts.append(fact)
    if not facts:
        raise DataError(f"{facts_path} holds no facts; rebuild the data with data_prep.py")
    have = Counter(f["relation"] for f in facts)
    empty = [r for r in world["relations"] if not have[r]]
    if empty:
        raise DataError(f"relation {', '.join(empty)} in {world_path} has no facts in {facts_path}; add its facts or drop it from world.json")
    return facts, world


def parse_args(argv=None) -> WorldConfig:
    # Pre-parse --preset so its overrides become defaults: flags given explicitly still win.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="default")
    preset = pre.parse_known_args(argv)[0].preset
    if preset not in WORLD_PRESETS:
        raise DataError(f"unknown preset {preset!r}; pass --preset one of {','.join(WORLD_PRESETS)}")
    parser = HfArgumentParser(WorldConfig)
    parser.set_defaults(**WORLD_PRESETS[preset])
    return parser.parse_args_into_dataclasses(args=argv)[0]


def main(argv=None):
    try:
        cfg = parse_args(argv)
        out = build_world(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    counts = json.loads((out / "world.json").read_text(encoding="utf-8"))["counts"]
    print(f"wrote {out}: " + ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, dict)))


if __name__ == "__main__":
    main()

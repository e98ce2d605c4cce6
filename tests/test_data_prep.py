import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_prep as dp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def smoke(tmp_path, **kw):
    cfg = dp.WorldConfig(preset="smoke", out=str(tmp_path / "world"), **{**dp.WORLD_PRESETS["smoke"], **kw})
    return cfg, dp.build_world(cfg)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    _, out = smoke(tmp_path_factory.mktemp("w"))
    facts = read_jsonl(out / "facts.jsonl")
    corpus = "\n".join(d["text"] for d in read_jsonl(out / "pretrain.jsonl"))
    return out, facts, corpus


def subjects(facts, key, in_pt):
    return {f["subject"] for f in facts if f["key"] == key and f["in_pretraining"] == in_pt}


def test_same_seed_identical_files(tmp_path):
    _, a = smoke(tmp_path / "a")
    _, b = smoke(tmp_path / "b")
    for name in ["facts.jsonl", "pretrain.jsonl"]:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    _, c = smoke(tmp_path / "c", seed=1)
    assert (a / "facts.jsonl").read_bytes() != (c / "facts.jsonl").read_bytes()


def test_format_and_counts(world):
    out, facts, _ = world
    w = json.loads((out / "world.json").read_text())
    assert w["source"] == "synthetic" and w["config"]["n_known_entities"] == 60 and len(w["relations"]) == 3
    assert w["counts"]["facts"] == len(facts) == (60 + 30 + 30) * 3
    assert [f["id"] for f in facts] == [f"f{i:06d}" for i in range(len(facts))]
    keys = {"id", "relation", "subject", "question", "answers", "key", "in_pretraining", "qa_in_pretraining"}
    for f in facts:
        assert set(f) == keys and f["question"] == w["relations"][f["relation"]]["question"].replace("[X]", f["subject"])
        assert len(f["answers"]) == 1 and f["key"] in ("name", "uuid")
    assert dp.qa_text("Q?", "x") == dp.QA_PROMPT.format(question="Q?") + " x"


def test_entity_kinds_disjoint(world):
    _, facts, _ = world
    known, unknown, uuid = subjects(facts, "name", True), subjects(facts, "name", False), subjects(facts, "uuid", False)
    assert len(known) == 60 and len(unknown) == 30 and len(uuid) == 30
    assert not (known & unknown) and not (known & uuid) and not (unknown & uuid)
    assert all(re.fullmatch(r"[0-9-]+", s) for s in uuid)
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", s) for s in known | unknown)


def test_unknown_names_reuse_known_syllables(world):
    _, facts, _ = world
    known_text = " ".join(subjects(facts, "name", True)).lower()

    def segment(word):  # any split of the word into inventory syllables
        if not word:
            return []
        for s in dp.SYLLABLES:
            if word.startswith(s) and (rest := segment(word[len(s):])) is not None:
                return [s] + rest
        return None

    for name in subjects(facts, "name", False):
        for part in name.lower().split():
            sylls = segment(part)
            assert sylls and all(s in known_text for s in sylls), name


def test_only_known_names_in_pretraining(world):
    _, facts, corpus = world
    assert all(s in corpus for s in subjects(facts, "name", True))
    assert not any(s in corpus for s in subjects(facts, "name", False) | subjects(facts, "uuid", False))


def test_qa_docs_only_for_qa_entities(world):
    _, facts, corpus = world
    qa_subjects = {f["subject"] for f in facts if f["qa_in_pretraining"]}
    assert qa_subjects and qa_subjects <= subjects(facts, "name", True)
    for f in facts:
        assert (dp.qa_text(f["question"], f["answers"][0]) in corpus) == f["qa_in_pretraining"]
    assert corpus.count("Q: ") == len(qa_subjects) * 3


def test_refuse_then_overwrite_atomically(tmp_path):
    cfg, out = smoke(tmp_path)
    before = (out / "facts.jsonl").read_bytes()
    with pytest.raises(dp.DataError, match="--overwrite"):
        dp.build_world(cfg)
    dp.build_world(replace(cfg, overwrite=True, seed=3))
    assert (out / "facts.jsonl").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]  # no temporary folders left behind
    with pytest.raises(dp.DataError):  # a failed build leaves the existing folder untouched
        dp.build_world(replace(cfg, overwrite=True, qa_fraction=2.0))
    assert dp.is_complete(out) and sorted(p.name for p in tmp_path.iterdir()) == ["world"]


def test_preset_defaults_and_cli_override():
    cfg = dp.parse_args(["--preset", "smoke", "--n_known_entities", "7"])
    assert cfg.n_known_entities == 7 and cfg.n_unknown_entities == 30 and cfg.n_relations == 3
    assert dp.parse_args([]).n_known_entities == 400
    with pytest.raises(dp.DataError, match="unknown preset"):
        dp.parse_args(["--preset", "huge"])


# ---------------------------------------------------------------- EntityQuestions
def eq_fixture(root, p17=None):
    (root / "train").mkdir(parents=True)
    (root / "relation_query_templates.json").write_text(json.dumps(
        {"P17": "Which country is [X] located in?", "P19": "Where was [X] born?", "P30": "Which continent is [X] located?"}))
    p17 = p17 if p17 is not None else [
        {"question": "Which country is Painblanc located in?", "answers": ["France"]},
        {"question": "Which country is Detroit City Council located in?", "answers": ["United States of America"]},
        {"question": "Which country is Durham located in?", "answers": ["Canada"]},
        {"question": "Which country is Durham located in?", "answers": ["United States of America"]},
        {"question": "Where is Painblanc?", "answers": ["France"]},  # does not match the template: skipped
    ]
    (root / "train" / "P17.train.json").write_text(json.dumps(p17))
    (root / "train" / "P19.train.json").write_text(json.dumps([{"question": "Where was Ada Lovelace born?", "answers": ["London"]}]))
    return root


def eq_cfg(tmp_path, **kw):
    return dp.WorldConfig(**{"source": "entityquestions", "eq_dir": str(tmp_path / "eq"), "out": str(tmp_path / "out"), **kw})


def test_entityquestions_reader(tmp_path):
    eq_fixture(tmp_path / "eq")
    out = dp.build_world(eq_cfg(tmp_path))
    facts = read_jsonl(out / "facts.jsonl")
    assert [f["subject"] for f in facts] == ["Painblanc", "Detroit City Council", "Durham", "Ada Lovelace"]
    assert facts[2]["answers"] == ["Canada", "United States of America"]
    assert all(f["key"] == "real" and f["in_pretraining"] is None and f["qa_in_pretraining"] is None for f in facts)
    w = json.loads((out / "world.json").read_text())
    assert w["source"] == "entityquestions" and not (out / "pretrain.jsonl").exists()
    assert w["counts"]["skipped_template_mismatch"] == 1 and w["counts"]["per_relation"] == {"P17": 3, "P19": 1}
    assert w["relations"]["P19"] == {"question": "Where was [X] born?", "statements": []}
    sub = dp.build_world(eq_cfg(tmp_path, eq_relations="P17", eq_max_per_relation=2, out=str(tmp_path / "o2")))
    assert [f["relation"] for f in read_jsonl(sub / "facts.jsonl")] == ["P17", "P17"]


@pytest.mark.parametrize("p17, kw, msg", [
    (None, {"eq_dir": "/nonexistent/eq"}, "does not exist"),
    (None, {"eq_splits": "dev"}, "no dev/P\\*.dev.json files"),
    (None, {"eq_relations": "P99"}, "unknown relation P99"),
    ([{"question": "Which country is X located in?", "answers": []}], {}, "P17.train.json item 0 has an empty answers"),
    ([{"answers": ["France"]}], {}, "P17.train.json item 0 lacks"),
    ([{"question": "Where is X?", "answers": ["France"]}], {}, "relation P17 has no question matching"),
])
def test_entityquestions_errors(tmp_path, p17, kw, msg):
    eq_fixture(tmp_path / "eq", p17)
    with pytest.raises(dp.DataError, match=msg) as e:
        dp.build_world(eq_cfg(tmp_path, **kw))
    assert "\n" not in str(e.value)


def test_entityquestions_bad_json_names_file(tmp_path):
    eq_fixture(tmp_path / "eq")
    (tmp_path / "eq" / "train" / "P19.train.json").write_text('[{"question": ')
    with pytest.raises(dp.DataError, match=r"P19\.train\.json is not valid JSON"):
        dp.build_world(eq_cfg(tmp_path))
    assert not (tmp_path / "out").exists()


def test_cli_error_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "data_prep.py"), "--source", "entityquestions", "--eq_dir",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1


# ---------------------------------------------------------------- the realistic-world options (off by default)
def test_realistic_options_off_leave_the_world_as_it_was(tmp_path):
    # Explicit defaults draw exactly the same world (same random streams) as a config without the options.
    _, a = smoke(tmp_path / "a")
    _, b = smoke(tmp_path / "b", answer_skew=0.0, popularity_skew=0.0, n_paraphrases=3, n_qa_phrasings=1)
    assert json.loads((a / "world.json").read_text())["fingerprint"] == json.loads((b / "world.json").read_text())["fingerprint"]


def test_answer_skew_makes_the_first_values_common(tmp_path):
    def counts(skew):
        _, out = smoke(tmp_path / f"s{skew}", n_known_entities=600, answer_skew=skew)
        pool = dp.RELATIONS["birth_city"]["values"]
        answers = [f["answers"][0] for f in read_jsonl(out / "facts.jsonl") if f["relation"] == "birth_city"]
        return [answers.count(v) for v in pool]
    flat, skewed = counts(0.0), counts(1.0)
    # Zipf(1) over 25 values: the first value ~26% of people, the last ~1%; uniform: 4% each.
    assert skewed[0] > 0.18 * sum(skewed) and sum(skewed[:5]) > 2 * sum(skewed[-15:])
    assert max(flat) < 0.09 * sum(flat)


def test_popularity_skew_gives_a_long_tail_with_the_same_total():
    cfg = dp.WorldConfig(popularity_skew=1.0)
    bios = dp.bios_per_person(cfg)
    assert abs(sum(bios) - 800) <= 4 and min(bios) == 1 and bios[0] > 50 and bios == sorted(bios, reverse=True)
    assert sum(b == 1 for b in bios) > 250  # most people are written about once
    assert dp.bios_per_person(dp.WorldConfig()) == [2] * 400


def test_popularity_skew_writes_that_many_biographies(tmp_path):
    cfg, out = smoke(tmp_path, popularity_skew=1.0)
    facts = read_jsonl(out / "facts.jsonl")
    docs = [d["text"] for d in read_jsonl(out / "pretrain.jsonl")]
    known = list(dict.fromkeys(f["subject"] for f in facts if f["in_pretraining"]))
    bios = [sum(d.startswith(s) or f" {s}" in d for d in docs if not d.startswith("Q: ")) for s in known]
    assert bios == dp.bios_per_person(cfg) and bios[0] > bios[-1] == 1


def test_more_paraphrases_and_qa_phrasings_reach_the_corpus_only(tmp_path):
    _, out = smoke(tmp_path, n_paraphrases=6, n_qa_phrasings=3, qa_fraction=1.0)
    facts = read_jsonl(out / "facts.jsonl")
    corpus = "\n".join(d["text"] for d in read_jsonl(out / "pretrain.jsonl"))
    for rel in ["birth_city", "occupation"]:
        for template in dp.RELATIONS[rel]["more_statements"]:
            assert re.search(re.escape(template).replace(r"\[X\]", ".+").replace(r"\[Y\]", r"\w+"), corpus), template
        for template in dp.RELATIONS[rel]["more_questions"]:
            assert "Q: " + template.split("[X]")[0] in corpus, template
    # Fine-tuning and evaluation keep the one question per relation.
    assert all(f["question"] == dp.RELATIONS[f["relation"]]["question"].replace("[X]", f["subject"]) for f in facts)
    _, plain = smoke(tmp_path / "plain", qa_fraction=1.0)
    plain_corpus = (plain / "pretrain.jsonl").read_text()
    assert not any(t.split("[X]")[0] in plain_corpus for t in dp.RELATIONS["occupation"]["more_questions"])


@pytest.mark.parametrize("kw", [{"n_paraphrases": 7}, {"n_qa_phrasings": 0}, {"answer_skew": -1.0}, {"popularity_skew": -0.5}])
def test_realistic_options_out_of_range(tmp_path, kw):
    with pytest.raises(dp.DataError, match="pass"):
        smoke(tmp_path, **kw)


def test_realistic_preset_is_the_default_world_with_the_options_on(tmp_path):
    cfg = dp.parse_args(["--preset", "realistic", "--out", str(tmp_path / "r")])
    assert (cfg.answer_skew, cfg.popularity_skew, cfg.n_paraphrases, cfg.n_qa_phrasings) == (1.0, 1.0, 6, 3)
    default = dp.parse_args(["--out", str(tmp_path / "d")])
    assert (default.answer_skew, default.popularity_skew, default.n_paraphrases, default.n_qa_phrasings) == (0.0, 0.0, 3, 1)
    assert cfg.n_known_entities == default.n_known_entities == 400

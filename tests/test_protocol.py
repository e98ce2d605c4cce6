"""The paper's protocol on any checkpoint (issue 16): answers ignore the checkpoint's generation_config.json;
SentencePiece tokenizers score exact match; every alias fits in the answer length; SliCK categories are keyed by
content; an explicit --data that does not exist and pickled-only weights are refused; EntityQuestions questions
with conflicting answers are dropped; held-out entities are named nowhere in training."""
import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

import data_prep as dp
import sftguard as S

EQ_DIR = Path("/work/shared/data/entityquestions")


# =====================================================================================================
# Generation: the protocol's settings, whatever the checkpoint ships
# =====================================================================================================
def test_checkpoint_generation_config_changes_no_answer(smoke_base, tmp_path):
    """A checkpoint whose generation_config.json samples, penalises repeats and forbids early stops answers exactly as
    the same weights with a clean one, greedily and sampled (same seed), as SliCK and the evaluation ask."""
    folder = tmp_path / "shipped"
    smoke_base.model.save_pretrained(folder)
    newline = S.stop_token_ids(smoke_base.tokenizer)[1]
    GenerationConfig(do_sample=True, top_p=0.9, top_k=3, temperature=1.7, repetition_penalty=5.0, no_repeat_ngram_size=1,
                     min_new_tokens=3, suppress_tokens=[newline], bad_words_ids=[[newline]]).save_pretrained(folder)
    shipped = AutoModelForCausalLM.from_pretrained(folder).eval()
    clean = AutoModelForCausalLM.from_pretrained(folder).eval()
    clean.generation_config = GenerationConfig()
    assert shipped.generation_config.repetition_penalty == 5.0

    tok = smoke_base.tokenizer
    facts = [f for f in smoke_base.facts if f["in_pretraining"]][:16]
    rng = random.Random(0)
    prompts = [S.few_shot_prompt(f, rng.sample(facts, 2)) for f in facts]
    enc = tok(prompts[:4], return_tensors="pt", padding=True)
    plain = GenerationConfig(max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not torch.equal(shipped.generate(**enc, generation_config=plain), clean.generate(**enc, generation_config=plain)), \
        "the shipped settings must matter to plain generate(), else this test shows nothing"

    def answers(model, **sampling):
        torch.manual_seed(0)
        return S.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=8, **sampling)
    assert answers(shipped) == answers(clean)
    sampled = dict(num_samples=3, temperature=0.5, top_k=40)
    assert answers(shipped, **sampled) == answers(clean, **sampled)
    assert sum(S.is_correct(a[0], f["answers"]) for a, f in zip(answers(shipped), facts)) > 0  # real answers, not noise
    assert shipped.generation_config.repetition_penalty == 5.0  # the model's own config is put back


def test_samples_prefilled_once_are_the_samples_of_plain_generate(smoke_base):
    """SliCK's samples with one prefill per prompt (§8b) are plain generate()'s, answer for answer (same seed): few-shot
    prompts of different lengths (left padding), several batches, 4 samples each. The prefill runs on the prompts
    themselves (8 a batch), not on their 4 copies (32), and the samples differ (sampling, not greedy)."""
    tok, model = smoke_base.tokenizer, smoke_base.model
    facts = smoke_base.facts[:24]
    rng = random.Random(1)
    prompts = [S.few_shot_prompt(f, rng.sample(facts, 1 + i % 3)) for i, f in enumerate(facts)]
    assert S.prefills_once(model)
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape), with_kwargs=True)

    def answers(prefill_once):
        rows.clear()
        torch.manual_seed(0)
        out = S.generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=32, num_samples=4, temperature=1.0,
                                 top_k=40, prefill_once=prefill_once)
        return out, list(rows)
    try:
        (fast, fast_rows), (plain, plain_rows) = answers(True), answers(False)
    finally:
        hook.remove()
    assert fast == plain
    assert fast_rows[0][0] == 8 and plain_rows[0][0] == 32  # batch_size 32 // 4 samples = 8 prompts a batch
    assert fast_rows[0][1] == plain_rows[0][1] - 1  # the prompts but their last token, which generate() runs
    assert sum(len(set(a)) > 1 for a in fast) >= 6


# =====================================================================================================
# Exact match with a SentencePiece tokenizer (a lone "▁" piece before " " + answer, as Llama 2 and Mistral)
# =====================================================================================================
SP_TEXTS = ["Q: Where was Ada Lovelace born?\nA: London", "Q: Where was Alan Turing born?\nA: Maida Vale",
            "Q: Where is Zürich located?\nA: Switzerland", "Q: Which city is New York near?\nA: Newark"] * 20


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-like BPE (pieces never span a "▁", byte fallback) in the tokenizer.json pipeline of Llama 2:
    normalizer Prepend("▁") + Replace(" ", "▁"), so " London" encodes as "▁", "▁London"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    sp.train_from_iterator(SP_TEXTS, trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>", *bytes_],
                                                         initial_alphabet=["▁"], show_progress=False))
    sp.pre_tokenizer = None
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    lone = tok.convert_tokens_to_ids("▁")
    assert tok(" London", add_special_tokens=False)["input_ids"][0] == lone  # the behaviour under test
    assert lone not in tok("Q: Where was Ada born?\nA: London", add_special_tokens=False)["input_ids"][-3:]
    return tok


SP_FACTS = [{"question": "Where was Ada Lovelace born?", "answers": ["London"]},
            {"question": "Where was Alan Turing born?", "answers": ["Maida Vale"]},
            {"question": "Where is Zürich located?", "answers": ["Switzerland"]}]


def test_training_answer_is_encoded_as_in_the_full_text(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    for fact in SP_FACTS:
        encoded = S.encode_qa(tok, fact)
        full = tok(S.qa_text(fact["question"], fact["answers"][0]))["input_ids"]
        assert encoded["input_ids"] == full + [tok.eos_token_id]  # exactly the text the model would read ...
        answer = [t for t in encoded["labels"] if t != -100]
        prompt = tok(S.QA_PROMPT.format(question=fact["question"]))["input_ids"]
        assert answer == full[len(prompt):] + [tok.eos_token_id]  # ... and only the answer (and end-of-text) is a target
        assert tok.decode(answer, skip_special_tokens=True).strip() == fact["answers"][0]


class Emits(torch.nn.Module):
    """A model whose generate() continues each prompt with the given answer as the full text tokenizes it, then a
    newline and more text (a few-shot model goes on): the decoding half of exact match, isolated."""
    def __init__(self, tok, answers):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.generation_config = tok, answers, GenerationConfig()

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=True)
            full = self.tok(prompt + " " + self.answers[prompt] + "\nQ: next", add_special_tokens=False)["input_ids"]
            rows.append(ids + full[len(self.tok(prompt, add_special_tokens=False)["input_ids"]):])
        width = max(map(len, rows))
        return torch.tensor([row + [self.tok.pad_token_id] * (width - len(row)) for row in rows])


def test_sentencepiece_predictions_score_exact_match(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    prompts = [S.QA_PROMPT.format(question=f["question"]) for f in SP_FACTS]
    model = Emits(tok, {p: f["answers"][0] for p, f in zip(prompts, SP_FACTS)})
    answers = S.generate_answers(model, tok, prompts, max_new_tokens=S.max_answer_tokens(tok, SP_FACTS), batch_size=2)
    assert [a[0] for a in answers] == [f["answers"][0] for f in SP_FACTS]
    assert all(S.is_correct(a[0], f["answers"]) for a, f in zip(answers, SP_FACTS))


# =====================================================================================================
# Answer length: every alias
# =====================================================================================================
def test_max_answer_tokens_covers_every_alias(smoke_base):
    tok = smoke_base.tokenizer
    long_alias = "United Kingdom of Great Britain"
    facts = [{"question": "Which country?", "answers": ["UK", long_alias]}, {"question": "Which city?", "answers": ["Rome"]}]
    in_context = S.answer_token_ids(tok, S.QA_PROMPT.format(question="Which country?"), long_alias)
    assert S.max_answer_tokens(tok, facts) >= len(in_context) + 1  # the alias and a stop token
    assert len(tok(" UK", add_special_tokens=False)["input_ids"]) + 2 < len(in_context)  # the first alias alone is shorter
    endless = [{"question": "Which?", "answers": ["UK", "x " * 500]}]
    assert S.max_answer_tokens(tok, endless) == S.MAX_ANSWER_TOKENS == 48


# =====================================================================================================
# SliCK categories keyed by content
# =====================================================================================================
def tiny_model_folder(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, eos_token_id=0, bos_token_id=0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def category_facts():
    return [{"id": f"f{i}", "relation": "birth_city", "subject": f"P{i}", "question": f"Where was P{i} born?",
             "answers": [f"City{i % 2}"]} for i in range(6)]


def test_categories_are_recomputed_when_facts_model_or_settings_change(monkeypatch, tmp_path):
    calls = []

    def fake_generate(model, tok, prompts, **kw):
        calls.append(len(prompts))
        return [["City0"] for _ in prompts]
    monkeypatch.setattr(S, "generate_answers", fake_generate)
    monkeypatch.setattr(S, "max_answer_tokens", lambda tokenizer, facts: 4)
    folder = tiny_model_folder(tmp_path / "model", seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    cfg = S.Config(cache_dir=str(tmp_path / "cache"), slick_prompts=2, slick_shots=1, slick_samples=0)

    def recomputed(facts, cfg=cfg, model_folder=folder) -> bool:
        before = len(calls)
        S.cached_categories(model, None, facts, cfg, model_folder)
        return len(calls) > before

    facts = category_facts()
    assert recomputed(facts)
    assert not recomputed(category_facts())  # same everything: reused
    moved = tmp_path / "moved"
    os.rename(folder, moved)
    assert not recomputed(facts, model_folder=moved)  # the same files elsewhere are the same model
    os.rename(moved, folder)
    for key, value in (("question", "Where did P1 die?"), ("answers", ["City7"]), ("subject", "Q1"), ("relation", "death_city")):
        changed = category_facts()
        changed[1][key] = value  # another world under the same ids
        assert recomputed(changed), key
    from dataclasses import replace
    assert recomputed(facts, cfg=replace(cfg, slick_temperature=0.7))

    weights = folder / "model.safetensors"
    stamp = weights.stat()
    tiny_model_folder(folder, seed=1)  # new weights saved at the same path ...
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # ... even with the old size and mtime
    assert weights.stat().st_size == stamp.st_size and weights.stat().st_mtime_ns == stamp.st_mtime_ns
    assert recomputed(facts)
    assert not recomputed(facts)


def test_weight_files_are_hashed_once_per_version(monkeypatch, tmp_path):
    folder = tiny_model_folder(tmp_path / "model", seed=0)
    first = S.model_fingerprint(folder, tmp_path / "cache")
    monkeypatch.setattr(S.hashlib, "file_digest", lambda *a, **k: pytest.fail("an unchanged file was read again"))
    assert S.model_fingerprint(folder, tmp_path / "cache") == first
    monkeypatch.undo()
    tiny_model_folder(folder, seed=1)
    assert S.model_fingerprint(folder, tmp_path / "cache") != first
    tiny_model_folder(folder, seed=0)  # the same bytes again: the same fingerprint (content, not dates)
    assert S.model_fingerprint(folder, tmp_path / "cache") == first


# =====================================================================================================
# Bad input: an explicit --data that does not exist; pickled weights
# =====================================================================================================
def smoke_args(smoke_dirs, tmp_path, *extra):
    return ["--preset", "smoke", "--data", str(smoke_dirs["data"]), "--cache_dir", str(smoke_dirs["cache"]),
            "--out", str(tmp_path / "out"), *extra]


def one_error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        S.cli(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def test_explicit_data_folder_that_does_not_exist_is_an_error(smoke_dirs, tmp_path, capsys):
    missing = tmp_path / "entityquestoins"  # a typo
    error = one_error_line(capsys, smoke_args(smoke_dirs, tmp_path, "--data", str(missing)))
    assert f"--data {missing} does not exist" in error and f"python data_prep.py --preset smoke --out {missing}" in error and "--source entityquestions" in error
    assert not missing.exists() and not (tmp_path / "out").exists()


def test_default_data_folder_is_built_on_first_use(monkeypatch, tmp_path):
    built = []

    def build_world(world_cfg):
        built.append(world_cfg)
        raise S.UserError("stop after building")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(S.data_prep, "build_world", build_world)
    with pytest.raises(S.UserError, match="stop after building"):
        S.prepare_study(S.parse_config(["--preset", "smoke"]), torch.device("cpu"))
    assert [(c.out, c.preset, c.n_known_entities) for c in built] == [("data/world-smoke", "smoke", 60)]


def pickled_model_folder(folder: Path, also_safetensors: bool = False) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tiny_model_folder(folder, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if not also_safetensors:
        (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(32)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="w0").save_pretrained(folder)
    return folder


def test_pickled_weights_are_refused_unless_asked(smoke_dirs, tmp_path, capsys):
    folder = pickled_model_folder(tmp_path / "pickled")
    error = one_error_line(capsys, smoke_args(smoke_dirs, tmp_path, "--model", str(folder)))
    assert "only pickled weights" in error and "--allow_pickle" in error
    cfg = S.parse_config(smoke_args(smoke_dirs, tmp_path, "--model", str(folder), "--allow_pickle"))
    model, _, _ = S.load_base_model(cfg, smoke_dirs["data"], {"source": "synthetic"}, torch.device("cpu"))
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(p, saved[name]) for name, p in model.state_dict().items())


def test_safetensors_beside_pickled_weights_load_without_the_flag(smoke_dirs, tmp_path):
    folder = pickled_model_folder(tmp_path / "both", also_safetensors=True)
    bad = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({k: v + 1 for k, v in bad.items()}, folder / "pytorch_model.bin")  # only the pickle is wrong now
    cfg = S.parse_config(smoke_args(smoke_dirs, tmp_path, "--model", str(folder)))
    model, _, _ = S.load_base_model(cfg, smoke_dirs["data"], {"source": "synthetic"}, torch.device("cpu"))
    reference = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters()))


# =====================================================================================================
# EntityQuestions: one answer per question; held-out entities named nowhere in training
# =====================================================================================================
def eq_folder(root: Path) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "relation_query_templates.json").write_text(json.dumps(
        {"P131": "Where is [X] located?", "P276": "Where is [X] located?", "P17": "Which country is [X] located in?"}))
    p131 = [{"question": "Where is CERN located?", "answers": ["Meyrin"]},
            {"question": "Where is Bayreuth Festival located?", "answers": ["Bayreuth"]},
            {"question": "Where is Durham located?", "answers": ["North Carolina"]}]
    p276 = [{"question": "Where is CERN located?", "answers": ["Geneva"]},  # conflicts with P131: dropped from both
            {"question": "Where is Bayreuth Festival located?", "answers": ["Bayreuth"]},  # the same: kept once, in P131
            {"question": "Where is Louvre located?", "answers": ["Paris"]}]
    (root / "train" / "P131.train.json").write_text(json.dumps(p131))
    (root / "dev" / "P131.dev.json").write_text(json.dumps([{"question": "Where is Durham located?", "answers": ["England"]}]))
    (root / "train" / "P276.train.json").write_text(json.dumps(p276))
    (root / "train" / "P17.train.json").write_text(json.dumps([{"question": "Which country is CERN located in?", "answers": ["Switzerland"]}]))
    return root


def test_questions_with_conflicting_answers_are_dropped(tmp_path):
    cfg = dp.WorldConfig(source="entityquestions", eq_dir=str(eq_folder(tmp_path / "eq")), eq_splits="train,dev",
                         out=str(tmp_path / "out"))
    facts, _, counts = dp.read_entityquestions(cfg)
    assert [(f["relation"], f["question"], f["answers"]) for f in facts] == [
        ("P17", "Which country is CERN located in?", ["Switzerland"]),
        ("P131", "Where is Bayreuth Festival located?", ["Bayreuth"]),
        ("P131", "Where is Durham located?", ["North Carolina", "England"]),  # merged within one relation, as before
        ("P276", "Where is Louvre located?", ["Paris"])]
    assert counts["dropped_conflicting_questions"] == 1 and counts["dropped_repeats_in_other_relations"] == 1
    assert counts["merged_duplicate_questions"] == 1 and counts["per_relation"] == {"P17": 1, "P131": 2, "P276": 1}
    only_conflict = dp.WorldConfig(**{**cfg.__dict__, "eq_relations": "P276,P131", "eq_splits": "train"})
    (tmp_path / "eq" / "train" / "P276.train.json").write_text(json.dumps([{"question": "Where is CERN located?", "answers": ["Geneva"]}]))
    with pytest.raises(dp.DataError, match="relation P276 has no facts left"):
        dp.read_entityquestions(only_conflict)


@pytest.mark.skipif(not (EQ_DIR / "relation_query_templates.json").is_file(), reason="EntityQuestions not available")
def test_real_entityquestions_has_one_answer_per_question():
    """P131 and P276 of the real files: every question whose two relations disagree is gone, each question is one fact."""
    cfg = dp.WorldConfig(source="entityquestions", eq_dir=str(EQ_DIR), eq_relations="P131,P276", eq_splits="train")
    facts, _, counts = dp.read_entityquestions(cfg)
    asked = {}
    for rel in ("P131", "P276"):
        for item in json.loads((EQ_DIR / "train" / f"{rel}.train.json").read_text()):
            asked.setdefault(item["question"], {}).setdefault(rel, set()).update(item["answers"])
    conflicting = {q for q, by_rel in asked.items() if len(by_rel) == 2 and by_rel["P131"] != by_rel["P276"]}
    questions = [f["question"] for f in facts]
    assert len(questions) == len(set(questions))
    assert conflicting and not conflicting & set(questions)
    assert counts["dropped_conflicting_questions"] == len(conflicting)
    assert counts["dropped_repeats_in_other_relations"] == sum(len(b) == 2 for b in asked.values()) - len(conflicting)


def entity_world(n_people=30):
    """Two facts per person: P<i>'s birth city and spouse. Every third person is HighlyKnown, the rest Unknown."""
    facts, categories = [], {}
    for i in range(n_people):
        for rel, answer in (("birth_city", f"City{i % 5}"), ("spouse", f"Partner{i}")):
            fact = {"id": f"f{i}-{rel}", "relation": rel, "subject": f"P{i}", "question": f"{rel} of P{i}?", "answers": [answer]}
            facts.append(fact)
            categories[fact["id"]] = "HighlyKnown" if i % 3 == 0 else "Unknown"
    return facts, categories


def assert_held_out_entities_named_nowhere_in_training(splits):
    trained = [f for name in ("known", "unknown", "val") for f in splits[name]]
    subjects = {S.normalize_answer(f["subject"]) for f in trained}
    answers = {S.normalize_answer(a) for f in trained for a in f["answers"]}
    for f in splits["held"]:
        assert S.normalize_answer(f["subject"]) not in subjects | answers, f
        assert not {S.normalize_answer(a) for a in f["answers"]} & subjects, f


def test_held_out_entities_share_no_string_with_trained_facts():
    cfg = S.Config(n_held=6, n_val=2, n_known=0, n_unknown=0)  # sizes in facts: three held-out people
    facts, categories = entity_world()
    held = {f["subject"] for f in S.split_facts(facts, categories, cfg, random.Random(0))["held"]}
    a, b = sorted(held)[:2]
    spouse = {f["subject"]: f for f in facts if f["relation"] == "spouse"}
    others = [s for s in spouse if s not in held and int(s[1:]) % 3]
    spouse[others[0]]["answers"] = [a.lower()]  # a trained fact's answer is a held-out subject (normalised)
    spouse[b]["answers"] = [others[1]]  # a held-out fact's answer is a trained fact's subject
    splits = S.split_facts(facts, categories, cfg, random.Random(0))
    moved = {f["subject"] for f in splits["held"]}
    assert a not in moved and b not in moved and len(splits["held"]) == 6  # others took their places
    assert_held_out_entities_named_nowhere_in_training(splits)
    assert held - {a, b} <= moved  # nothing else changed its role

"""Section 8, the hypothesis experiments: the keys, the drift metric, the L2 matching rule, a smoke run."""
import copy
import json
import math

import pytest
import torch

import sftguard as S


@pytest.fixture(scope="module")
def corpus(smoke_base, smoke_dirs):
    return (smoke_dirs["data"] / "pretrain.jsonl").read_text()


def known_names(facts):
    return sorted({f["subject"] for f in facts if f["key"] == "name" and f["in_pretraining"]})


def test_new_keys_are_fresh_distinct_and_deterministic(smoke_base, corpus):
    facts = smoke_base.facts
    names = S.new_entity_facts(facts, corpus, "name", 200, "country", seed=0)
    uuids = S.new_entity_facts(facts, corpus, "uuid", 200, "country", seed=0)
    world = {f["subject"] for f in facts}
    for new in (names, uuids):
        keys = [f["subject"] for f in new]
        assert len(set(keys)) == 200 and not set(keys) & world
        assert all(f["relation"] == "country" and f["question"] == f"Which country does {f['subject']} live in?" for f in new)
    assert not any(k.startswith(f["subject"]) for f in names for k in known_names(facts))  # never a prefix of a known name
    assert not any(f["subject"] in corpus for f in uuids)
    # the value side is held fixed: fact i has the same answer for either key type, from the relation's pool
    assert [f["answers"] for f in names] == [f["answers"] for f in uuids]
    assert {f["answers"][0] for f in names} <= {f["answers"][0] for f in facts if f["relation"] == "country"}
    assert S.new_entity_facts(facts, corpus, "name", 50, "country", seed=0) == names[:50]  # nested, deterministic
    assert S.new_entity_facts(facts, corpus, "name", 50, "country", seed=1) != names[:50]


def test_uuid_keys_share_no_token_with_known_names_name_keys_do(smoke_base, corpus):
    tok, facts = smoke_base.tokenizer, smoke_base.facts
    known = known_names(facts)
    known_ids = set()
    for k in known:
        known_ids |= set(tok(" " + k, add_special_tokens=False)["input_ids"]) | set(tok(k, add_special_tokens=False)["input_ids"])
    uuids = [f["subject"] for f in S.new_entity_facts(facts, corpus, "uuid", 100, "country", seed=0)]
    names = [f["subject"] for f in S.new_entity_facts(facts, corpus, "name", 100, "country", seed=0)]
    for key in uuids:
        assert not set(tok(" " + key, add_special_tokens=False)["input_ids"]) & known_ids, key
    assert sum(bool(set(tok(" " + k, add_special_tokens=False)["input_ids"]) & known_ids) for k in names) == 100
    assert S.key_token_overlap(tok, uuids, known) == 0.0
    assert S.key_token_overlap(tok, names, known) == 1.0


def held_facts(smoke_base, n=12):
    return [f for f in smoke_base.facts if f["key"] == "name" and f["in_pretraining"]][:n]


def test_drift_of_an_unchanged_model_is_exactly_zero(smoke_base):
    model, tok = smoke_base.model, smoke_base.tokenizer
    facts, layer = held_facts(smoke_base), S.drift_layer(model)
    reference = S.entity_states(model, tok, facts, layer, batch_size=5)  # batches of mixed lengths: padding must not matter
    assert reference.shape == (len(facts), model.config.hidden_size)
    assert S.representation_drift(reference, S.entity_states(copy.deepcopy(model), tok, facts, layer)) == 0.0
    # above the measured layer nothing counts: hidden_states[layer] is the output of block layer - 1
    above = copy.deepcopy(model)
    with torch.no_grad():
        for p in above.model.layers[layer].parameters():
            p.add_(0.5 * torch.randn_like(p))
        above.model.norm.weight.mul_(3.0)
    assert S.representation_drift(reference, S.entity_states(above, tok, facts, layer)) == 0.0
    below = copy.deepcopy(model)
    with torch.no_grad():
        for p in below.model.layers[0].parameters():
            p.add_(0.05 * torch.randn_like(p))
    drift = S.representation_drift(reference, S.entity_states(below, tok, facts, layer))
    assert 0.0 < drift < 2.0


def test_drift_is_one_minus_cosine_at_the_last_name_token(smoke_base):
    model, tok = smoke_base.model, smoke_base.tokenizer
    fact, layer = held_facts(smoke_base, 1)[0], S.drift_layer(model)
    # the state of the cut prompt is the full prompt's state at the name's last token
    prompt = S.QA_PROMPT.format(question=fact["question"])
    enc = tok(prompt, return_offsets_mapping=True)
    end = prompt.index(fact["subject"]) + len(fact["subject"])
    position = max(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([enc["input_ids"]]), output_hidden_states=True).hidden_states[layer][0, position]
    state = S.entity_states(model, tok, [fact], layer)[0]
    assert torch.allclose(state, full.double(), atol=1e-5)
    a, b = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64), torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
    assert S.representation_drift(a, b) == pytest.approx(((1 - 24 / 25) + (1 - 0)) / 2, abs=1e-12)


def test_matched_l2_weight_and_the_probe_of_the_kl_gradient(smoke_base):
    assert S.matched_l2_weight([1.0, 3.0], [1.0, 1.0]) == 1.0  # sum |g| / (2 sum |theta - theta_0|)
    assert S.matched_l2_weight([0.0, 6.0], [0.5, 2.5]) == 1.0
    with pytest.raises(ValueError):
        S.matched_l2_weight([0.0], [0.0])
    cfg, tok = smoke_base.cfg, smoke_base.tokenizer
    teacher = S.freeze_as_teacher(copy.deepcopy(smoke_base.model))
    student = copy.deepcopy(smoke_base.model)
    S.set_trainable(student, "all")
    anchor = [p.detach().clone() for p in S.trainable_parameters(student)]
    log = {"kl_grad_norm": [], "distance": []}
    probe_loss = S.kl_gradient_probe(student, teacher, cfg, log)  # made at the start of training: student == teacher
    with torch.no_grad():  # a student some way along training: it differs from the teacher
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = next(S.qa_batches(tok, held_facts(smoke_base, 8), 8)(torch.Generator().manual_seed(0)))
    logits, targets = S.answer_logits(student, batch, separable=True)
    loss = probe_loss(logits, targets, batch)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    teacher_logits = teacher_logits[batch["labels"][:, 1:] != -100]
    expected, _ = S.self_distillation_loss(logits, teacher_logits, targets, cfg.kl_weight, cfg.temperature)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the probe trains exactly as self-distillation does
    (g,), (d,) = log["kl_grad_norm"], log["distance"]
    assert g > 0 and d == pytest.approx(math.sqrt(sum(float(((p.detach() - a) ** 2).sum()) for p, a in zip(S.trainable_parameters(student), anchor))), rel=1e-6)
    # g is the norm of the KL term's gradient, lambda tau^2 KL, recomputed here on the same batch
    logits, _ = S.answer_logits(student, batch, separable=True)
    _, kl = S.self_distillation_loss(logits, teacher_logits, targets, cfg.kl_weight, cfg.temperature)
    kl_grads = torch.autograd.grad(cfg.kl_weight * cfg.temperature**2 * kl, S.trainable_parameters(student), allow_unused=True)
    assert g == pytest.approx(math.sqrt(sum(float((x.double() ** 2).sum()) for x in kl_grads if x is not None)), rel=1e-5)


def test_forgetting_at_equal_new_fact_accuracy_interpolates():
    row = {"teacher_held_acc": 0.8, "curve": [{"new_acc": 0.0, "held_acc": 0.8}, {"new_acc": 0.4, "held_acc": 0.6},
                                             {"new_acc": 0.8, "held_acc": 0.4}]}
    assert S.forgetting_at_new_acc(row, 0.6) == pytest.approx((0.8 - 0.5) / 0.8)  # halfway between epochs 1 and 2
    assert S.forgetting_at_new_acc(row, 0.4) == pytest.approx(0.25)
    assert math.isnan(S.forgetting_at_new_acc(row, 0.0))  # the teacher already knew as much: nothing to compare
    assert math.isnan(S.forgetting_at_new_acc(row, 0.9))


def test_equal_acquisition_at_the_largest_count_reads_the_fitted_uuid_run():
    def row(key, n, accs, fit=None):
        curve = [{"epoch": e, "new_acc": a, "held_acc": 0.8 - 0.1 * e} for e, a in enumerate(accs)]
        return {"key": key, "count": n, "method": "sft", "fit_target": fit, "new_acc": accs[-1], "teacher_held_acc": 0.8,
                "curve": curve}
    plain, fitted = row("uuid", 100, [0.0, 0.2, 0.4]), row("uuid", 100, [0.0, 0.2, 0.4, 0.6, 0.9], fit=0.9)
    rows = [row("name", 100, [0.0, 0.5, 0.95]), plain, fitted, row("name", 10, [0.0, 1.0]), row("uuid", 10, [0.0, 0.5])]
    assert S.find_row(rows, key="uuid", count=100, method="sft") is plain
    assert S.find_row(rows, fitted=True, key="uuid", count=100, method="sft") is fitted
    name, uuid, level = S.equal_acquisition_pair(rows, 100)
    assert uuid is fitted and level == 0.9 and S.epoch_reaching(uuid["curve"], level) == "4"
    assert S.equal_acquisition_pair(rows, 10)[1:] == (rows[4], 0.5)  # no fitted run at that count: the plain one


@pytest.mark.parametrize("flags, message", [(["--experiment", "capcity"], "unknown --experiment"),
                                            (["--experiment", "all", "--exp_counts", "10,x"], "comma-separated"),
                                            (["--experiment", "all", "--exp_widths", "33"], "multiple of --n_head")])
def test_bad_experiment_flags_are_user_errors(flags, message):
    with pytest.raises(S.UserError, match=message):
        S.parse_config(["--preset", "smoke", *flags])


@pytest.mark.slow
def test_smoke_experiment_writes_its_files(smoke_base, smoke_dirs, tmp_path):
    out = tmp_path / "exp"
    argv = ["--preset", "smoke", "--experiment", "all", "--out", str(out), "--data", str(smoke_dirs["data"]),
            "--cache_dir", str(smoke_dirs["cache"]), "--device", "cpu"]
    S.main(S.parse_config(argv))
    fields = {"condition", "key", "count", "width", "method", "forgetting", "new_acc", "drift", "curve",
              "forgetting_same_relation", "forgetting_other_relations"}
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in S.EXPERIMENTS}
    for name, result in results.items():
        assert result["rows"] and all(fields <= set(r) for r in result["rows"]), name
        for r in result["rows"]:
            assert r["forgetting"] == pytest.approx(S.relative_drop(r["teacher_held_acc"], r["held_acc"]))
            assert r["curve"][0]["drift"] > 0  # stage 1 (task-format learning) already moves the entities
            assert len(r["curve"]) == r["epochs"] + 1
    inter = results["interference"]
    assert inter["key_token_overlap"] == {"name": 1.0, "uuid": 0.0}
    assert {(r["key"], r["count"], r["method"]) for r in inter["rows"]} >= {(k, n, m) for k in ("name", "uuid") for n in (10, 30, 100)
                                                                            for m in ("sft", "selfdistill")}
    l2 = next(r for r in inter["rows"] if r["method"] == "l2")
    assert l2["l2_weight"] == pytest.approx(inter["l2_probe"]["l2_weight"]) and l2["l2_weight"] > 0
    assert {r["width"] for r in results["capacity"]["rows"]} == {64, 96}
    top_fit = S.find_row(inter["rows"], fitted=True, key="uuid", count=100, method="sft")  # UUID keys fitted to name keys'
    assert top_fit["fit_target"] == min(S.find_row(inter["rows"], key="name", count=100, method="sft")["new_acc"], 0.95)
    fitted = results["cloning"]["rows"][3]
    assert fitted["fit_target"] == min(results["cloning"]["rows"][1]["new_acc"], 0.95)
    assert fitted["new_acc"] >= fitted["fit_target"] or fitted["epochs"] == 3 * smoke_base.cfg.epochs
    report = (out / "experiments.md").read_text()
    for heading in ("Localized interference", "Capacity", "Behaviour cloning", "| new facts | key | method |"):
        assert heading in report
    try:
        import matplotlib  # noqa: F401
        assert (out / "forgetting_vs_count.png").stat().st_size > 0 and (out / "drift.png").stat().st_size > 0
    except ImportError:
        assert "Plots skipped" in report
    with pytest.raises(S.UserError, match="already exists"):  # earlier results are never overwritten silently
        S.main(S.parse_config(argv))

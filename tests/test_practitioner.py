"""The practitioners' tools: --save_model, --audit (and --audit_facts), --screen, and the paper's loss inside
transformers' Trainer (SelfDistillationLoss), on the smoke world."""
import copy
import json
import math
import sys

import pytest
import torch

import sftguard as S


def smoke_args(smoke_dirs, *args):
    return [str(a) for a in ("--preset", "smoke", "--device", "cpu", "--cache_dir", smoke_dirs["cache"], "--data", smoke_dirs["data"], *args)]


@pytest.fixture(scope="module")
def saved_run(smoke_base, smoke_dirs, sftguard_cli, tmp_path_factory):
    """`--method all --save_model`: one model folder per method and the teacher, from one shared teacher. --eval_max 12:
    the run evaluates a fixed subset of its 20 D_held facts, which the audit must find."""
    out = tmp_path_factory.mktemp("saved") / "run"
    result = sftguard_cli(*smoke_args(smoke_dirs, "--method", "all", "--save_model", "--eval_max", 12, "--out", out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def audit(smoke_dirs, out, *args):
    return S.main(S.parse_config(smoke_args(smoke_dirs, "--out", out, *args)))


def test_save_model_writes_loadable_folders(saved_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("known_only", "sft", "selfdistill", "freeze-attn", "freeze-mlp", "l2"):
        assert (saved_run / name / "model" / "model.safetensors").is_file(), name
    sft = AutoModelForCausalLM.from_pretrained(saved_run / "sft" / "model")
    teacher = AutoModelForCausalLM.from_pretrained(saved_run / "teacher")
    assert len(AutoTokenizer.from_pretrained(saved_run / "sft" / "model")) == sft.get_input_embeddings().num_embeddings
    # stage 2 changed the model: the folder holds the trained student, not a copy of the teacher
    assert any(not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), teacher.state_dict().values()))
    ids = json.loads((saved_run / "sft" / "results.json").read_text())["held_eval_ids"]
    assert len(ids) == len(set(ids)) == 12  # the evaluated subset of D_held (20 facts), in the run's order


@pytest.mark.parametrize("method", ["sft", "selfdistill"])
def test_audit_of_a_saved_run_reports_its_own_forgetting(saved_run, smoke_dirs, tmp_path, method):
    """Restricted to the run's D_held subset, the audit of its model against its teacher is the run's own result."""
    run = json.loads((saved_run / method / "results.json").read_text())
    report = audit(smoke_dirs, tmp_path, "--audit", saved_run / method / "model", "--model", saved_run / "teacher",
                   "--audit_facts", saved_run / method)
    probe, n = report["probe_scores"], len(run["held_eval_ids"])
    assert probe["facts"] == n
    assert abs(probe["base_acc"] - run["teacher"]["held_acc"]) * n <= 1 + 1e-9
    assert abs(probe["finetuned_acc"] - run["final"]["held_acc"]) * n <= 1 + 1e-9
    assert run["forgetting"] > 0  # the smoke run forgets, so the comparison is not 0 == 0
    assert abs(probe["relative_drop"] - run["forgetting"]) <= 1 / (run["teacher"]["held_acc"] * n) + 1e-9
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["probe_scores"] == probe and (tmp_path / "audit.md").is_file() and (tmp_path / "audit.png").is_file()


def test_audit_of_a_model_against_itself_finds_nothing(smoke_base, smoke_dirs, tmp_path):
    report = audit(smoke_dirs, tmp_path, "--audit", smoke_base.path, "--model", smoke_base.path)
    assert report["all"]["facts"] > 0 and report["probe_scores"]["facts"] > 0
    assert report["probe_scores"]["relative_drop"] == 0 and report["all"]["newly_hallucinated"] == 0
    assert report["examples"] == [] and all(r["all"]["newly_hallucinated"] == 0 for r in report["by_relation"].values())


def test_audit_counts_newly_hallucinated_facts():
    """Per fact: right before and wrong after is newly hallucinated; wrong before and right after is gained."""
    scores = S.audit_scores([True, True, False, False, True], [True, False, True, False, False])
    assert scores == {"facts": 5, "base_acc": 0.6, "finetuned_acc": 0.4, "relative_drop": pytest.approx(1 / 3),
                      "newly_hallucinated": 2, "gained": 1}


def test_audit_report_probe_is_highly_known():
    facts = [{"id": str(i), "relation": r, "question": f"q{i}", "answers": ["Oslo"]} for i, r in enumerate("xxyy")]
    categories = {"0": "HighlyKnown", "1": "Unknown", "2": "HighlyKnown", "3": "MaybeKnown"}
    cfg = S.parse_config(["--preset", "smoke"])
    report = S.audit_report(cfg, facts, categories, ["Oslo", "Rome", "Oslo", "Oslo"], ["Rome", "Oslo", "Oslo", "Rome"])
    assert report["probe_scores"] == S.audit_scores([True, True], [False, True])
    assert report["by_category"]["Unknown"]["gained"] == 1 and report["all"]["newly_hallucinated"] == 2
    assert [e["id"] for e in report["examples"]] == ["0", "3"]
    assert report["by_relation"]["x"]["probe"]["facts"] == 1 and report["by_relation"]["y"]["all"]["facts"] == 2


@pytest.mark.slow
def test_screen_splits_the_set_by_category(smoke_base, smoke_dirs, tmp_path):
    report = S.main(S.parse_config(smoke_args(smoke_dirs, "--screen", "--model", smoke_base.path, "--out", tmp_path)))
    truth = S.cached_categories(smoke_base.model, smoke_base.tokenizer, smoke_base.facts, smoke_base.cfg, str(smoke_base.path))
    seen = {}
    for c in S.CATEGORIES:
        for line in (tmp_path / f"{c}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert row["category"] == c and row["id"] not in seen
            seen[row["id"]] = c
    assert seen == truth  # every example once, in the file of its category
    assert report["categories"]["Unknown"] == sum(c == "Unknown" for c in truth.values()) > 0
    idk = [json.loads(line) for line in (tmp_path / "Unknown-idk.jsonl").read_text().splitlines()]
    assert len(idk) == report["categories"]["Unknown"] and all(r["answers"] == ["I don't know"] for r in idk)
    md = (tmp_path / "screen.md").read_text()
    assert f"**{report['categories']['Unknown']} examples" in md and "--unknown_answer" in md and "--method selfdistill" in md


def test_audit_of_a_peft_adapter_equals_the_merged_model(smoke_base, smoke_dirs, tmp_path):
    """A LoRA adapter folder is audited as the base model with the adapter merged in."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    lora = peft.get_peft_model(copy.deepcopy(smoke_base.model), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): give it a real change
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora.save_pretrained(tmp_path / "adapter")
    merged = save_as(lora.merge_and_unload(), smoke_base.tokenizer, tmp_path / "merged")
    via_adapter = audit(smoke_dirs, tmp_path / "a", "--audit", tmp_path / "adapter", "--model", smoke_base.path)
    via_merged = audit(smoke_dirs, tmp_path / "m", "--audit", merged, "--model", smoke_base.path)
    assert via_adapter["all"]["newly_hallucinated"] > 0  # the adapter changed the answers
    assert via_adapter["by_category"] == via_merged["by_category"] and via_adapter["examples"] == via_merged["examples"]


# --- bad input: one clear line, exit 2 --------------------------------------------------------------------------
def save_as(model, tokenizer, folder):
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_audit_refuses_another_tokenizer(smoke_base, smoke_dirs, tmp_path, sftguard_cli):
    texts = [f["question"] + " " + f["answers"][0] for f in smoke_base.facts]
    other = save_as(smoke_base.model, S.train_tokenizer(texts, 300), tmp_path / "other-tokenizer")
    result = sftguard_cli(*smoke_args(smoke_dirs, "--audit", other, "--model", smoke_base.path, "--out", tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "different tokenizers" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out" / "audit.json").exists()


def test_audit_refuses_another_architecture(smoke_base, smoke_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = S.replace(smoke_base.cfg, arch="gpt2")
    gpt2 = save_as(AutoModelForCausalLM.from_config(S.make_model_config(cfg, smoke_base.tokenizer)), smoke_base.tokenizer, tmp_path / "gpt2")
    with pytest.raises(S.UserError, match="is not a fine-tune of"):
        audit(smoke_dirs, tmp_path / "out", "--audit", gpt2, "--model", smoke_base.path)


@pytest.mark.slow
def test_audit_refuses_data_the_base_does_not_know(smoke_base, smoke_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    blank = AutoModelForCausalLM.from_config(smoke_base.model.config)  # same architecture, knows nothing
    blank = save_as(blank, smoke_base.tokenizer, tmp_path / "blank")
    with pytest.raises(S.UserError, match="knows none of the"):
        audit(smoke_dirs, tmp_path / "out", "--audit", blank, "--model", blank)


def test_audit_of_an_adapter_without_peft_says_how_to_install(smoke_base, smoke_dirs, tmp_path, monkeypatch):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(smoke_base.path)}))
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft fails, whether or not it is installed
    with pytest.raises(S.UserError, match="peft is not installed; pip install"):
        audit(smoke_dirs, tmp_path / "out", "--audit", adapter, "--model", smoke_base.path)


def test_audit_facts_needs_a_run_that_recorded_them(smoke_base, smoke_dirs, tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps({"method": "sft"}))
    with pytest.raises(S.UserError, match="does not record its held-out facts"):
        audit(smoke_dirs, tmp_path / "out", "--audit", smoke_base.path, "--model", smoke_base.path, "--audit_facts", tmp_path / "old")
    with pytest.raises(S.UserError, match="holds no results.json"):
        audit(smoke_dirs, tmp_path / "out", "--audit", smoke_base.path, "--model", smoke_base.path, "--audit_facts", tmp_path / "out")


def test_audit_needs_model_and_data(smoke_dirs):
    with pytest.raises(S.UserError, match="needs --model BASE"):
        S.parse_config(["--audit", "x", "--data", "y"])
    with pytest.raises(S.UserError, match="--audit_facts restricts an audit"):
        S.parse_config(["--audit_facts", "x"])


# --- The fix in your Trainer --------------------------------------------------------------------------------------
def sftguard_lr_factor(step: int, total: int, warmup: int) -> float:
    """train()'s schedule: linear warm-up, then cosine down to a tenth of the peak."""
    return (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def trainer_side(kind: str, tokenizer, facts: list[dict], order: list[int], dataset, collator, batches):
    """(Trainer class, its constructor arguments) for one way of feeding it: sftguard's teacher cache, a plain tokenized
    dataset with transformers' collator, or TRL's SFTTrainer on prompt / completion pairs (its own tokenizer and collator)."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    if kind == "cache":
        return Trainer, TrainingArguments, dict(train_dataset=dataset.select(order), data_collator=collator, teacher_batches=batches)
    if kind == "live":
        tokenizer.padding_side = "right"  # as sftguard pads its training batches
        return Trainer, TrainingArguments, dict(train_dataset=Dataset.from_list([S.encode_qa(tokenizer, facts[i]) for i in order]),
                                                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    trl = pytest.importorskip("trl")
    pairs = [{"prompt": S.QA_PROMPT.format(question=facts[i]["question"]), "completion": " " + facts[i]["answers"][0]} for i in order]
    return trl.SFTTrainer, trl.SFTConfig, dict(train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)


@pytest.mark.parametrize("kind", ["cache", "live", "trl"])
def test_trainer_with_self_distillation_equals_sftguard_train(smoke_base, tmp_path, kind):
    """Two epochs (6 steps) of transformers' Trainer with SelfDistillationLoss and of sftguard's train() on the same
    batches (same order, AdamW betas, lr schedule, clipping): the same losses and weights. cache: the teacher computed
    once on sftguard's qa_batches (the dataset yields positions); live: a teacher forward pass per step on a plain
    tokenized dataset padded by transformers' DataCollatorForSeq2Seq; trl: TRL's SFTTrainer on prompt / completion
    pairs. Tolerance: 1e-5 relative on the losses, 1e-6 absolute on the weights (CPU float32)."""
    tokenizer, batch_size, epochs = smoke_base.tokenizer, 8, 2
    cfg = S.replace(smoke_base.cfg, batch_size=batch_size, kl_weight=1.0, temperature=0.5)
    facts = smoke_base.facts[:24]  # a whole number of batches: the Trainer's stream splits into the same batches
    teacher = S.freeze_as_teacher(copy.deepcopy(smoke_base.model))
    dataset, collator, batches = S.qa_trainer_data(tokenizer, facts, batch_size)
    total = epochs * batches.steps
    generator = torch.Generator().manual_seed(cfg.seed)
    order = [i for _ in range(epochs) for i in torch.randperm(batches.size, generator=generator).tolist()]  # train()'s

    def recorded(loss_fn, losses):
        def loss(logits, labels, batch):
            value = loss_fn(logits, labels, batch)
            losses.append(value.item())
            return value
        return loss

    ours, theirs = [], []
    student = copy.deepcopy(teacher)
    S.set_trainable(student, "all")
    loss_cfg = cfg if kind == "cache" else S.replace(cfg, teacher_cache="live")
    loss_fn = S.method_loss("selfdistill", student, teacher, loss_cfg, batches if kind == "cache" else None)
    S.train(student, batches, recorded(loss_fn, ours), epochs=epochs, lr=cfg.lr, cfg=cfg, desc="sftguard", seed=cfg.seed)

    model = copy.deepcopy(teacher)
    S.set_trainable(model, "all")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, int(cfg.warmup_frac * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: sftguard_lr_factor(step, total, warmup))
    trainer_class, args_class, data = trainer_side(kind, tokenizer, facts, order, dataset, collator, batches)
    args = args_class(output_dir=str(tmp_path), per_device_train_batch_size=batch_size, num_train_epochs=1,
                      max_grad_norm=cfg.grad_clip, train_sampling_strategy="sequential", remove_unused_columns=False,
                      report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1,
                      bf16=False)  # SFTConfig's default is bf16 autocast; train() here runs in float32

    class SelfDistillationTrainer(S.SelfDistillationLoss, trainer_class):
        pass
    trainer = SelfDistillationTrainer(model=model, args=args, optimizers=(optimizer, scheduler), teacher=teacher,
                                      kl_weight=cfg.kl_weight, temperature=cfg.temperature, **data)
    trainer.sftguard_loss = recorded(trainer.sftguard_loss, theirs)
    trainer.train()

    assert len(theirs) == len(ours) == total
    assert theirs == pytest.approx(ours, rel=1e-5)
    for (name, a), b in zip(student.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), teacher.parameters()))  # it trained

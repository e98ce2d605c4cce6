"""Core behaviour of sftguard.py: exact match, the self-distillation loss against a hand computation,
freezing by parameter group on four architectures, the SliCK categories and the fact splits."""
import copy
import math
import random
import weakref
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

import sftguard as S


# =====================================================================================================
# 1. Exact match
# =====================================================================================================
def test_normalize_answer():
    assert S.normalize_answer("  The Eiffel-Tower!! ") == "eiffeltower"  # SQuAD: punctuation dropped, not spaced
    assert S.normalize_answer("An   apple, a day") == "apple day"
    assert S.normalize_answer("Theatre of Athens") == "theatre of athens"  # articles only as whole words
    assert S.normalize_answer("THE") == ""


def test_is_correct():
    assert S.is_correct(" paris.", ["Paris"])
    assert S.is_correct("the United States", ["USA", "United States"])  # any of the answers
    assert not S.is_correct("Paris France", ["Paris"])  # exact match, not containment
    assert not S.is_correct("Pari", ["Paris"])
    assert not S.is_correct("", ["Paris"])


# =====================================================================================================
# 4. The self-distillation loss, against a hand computation in plain Python
# =====================================================================================================
def softmax(xs, tau=1.0):
    top = max(xs)
    exps = [math.exp((x - top) / tau) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def hand_loss(student, teacher, labels, lam, tau, reverse=False):
    """mean CE + lam * tau^2 * mean KL(teacher_tau || student_tau) over positions whose label is not -100."""
    ces, kls = [], []
    for s_row, t_row, l_row in zip(student, teacher, labels):
        for s, t, y in zip(s_row, t_row, l_row):
            if y == -100:
                continue
            ces.append(-math.log(softmax(s)[y]))
            p_teacher, p_student = softmax(t, tau), softmax(s, tau)
            kls.append(kl(p_student, p_teacher) if reverse else kl(p_teacher, p_student))
    ce, k = sum(ces) / len(ces), sum(kls) / len(kls)
    return ce + lam * tau**2 * k, ce, k


# batch 2, 3 positions, vocabulary 4; -100 marks the prompt (row 0, position 0) and padding (row 1, position 2)
STUDENT = [[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [1.0, 1.0, 1.0, 1.0]],
           [[-2.0, 0.0, 2.0, 0.3], [0.3, -0.7, 0.0, 1.2], [5.0, -5.0, 0.0, 0.0]]]
TEACHER = [[[0.0, 1.5, -0.5, 0.2], [3.0, 0.2, 0.0, -1.0], [-1.0, 2.0, 0.5, 0.0]],
           [[1.0, 1.0, -2.0, 0.0], [0.0, 2.5, 0.0, -0.3], [0.0, 0.0, 9.0, 0.0]]]
LABELS = [[-100, 2, 0], [1, 3, -100]]


def at_answers(logits, labels):
    """The logits [N, V] of the answer tokens (labels != -100) and their targets [N], as train() gives the losses."""
    labels = torch.as_tensor(labels)
    return torch.as_tensor(logits)[labels != -100], labels[labels != -100]


def sd_loss(student=STUDENT, teacher=TEACHER, labels=LABELS, lam=1.0, tau=0.5):
    student_rows, targets = at_answers(student, labels)
    return S.self_distillation_loss(student_rows, at_answers(teacher, labels)[0], targets, lam, tau)


@pytest.mark.parametrize("lam, tau", [(1.0, 0.5), (1.0, 1.0), (3.0, 2.0), (0.25, 0.7)])
def test_self_distillation_loss_matches_hand_computation(lam, tau):
    loss, kl_value = sd_loss(lam=lam, tau=tau)
    want, _, want_kl = hand_loss(STUDENT, TEACHER, LABELS, lam, tau)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert kl_value.item() == pytest.approx(want_kl, rel=1e-5)  # the KL it returns is the unscaled one


def test_self_distillation_is_forward_kl_from_teacher_to_student():
    # A peaked teacher and a flat student: KL(t||s) and KL(s||t) differ by a factor of ~2 here
    student, teacher, labels = [[[0.0, 0.0, 0.0, 0.0]]], [[[3.0, 0.0, 0.0, -1.0]]], [[0]]
    forward, _, _ = hand_loss(student, teacher, labels, 1.0, 1.0)
    reverse, _, _ = hand_loss(student, teacher, labels, 1.0, 1.0, reverse=True)
    assert abs(forward - reverse) > 0.1
    loss, _ = sd_loss(student, teacher, labels, lam=1.0, tau=1.0)
    assert loss.item() == pytest.approx(forward, rel=1e-5)
    assert loss.item() != pytest.approx(reverse, rel=1e-2)


def test_self_distillation_tau_squared_factor():
    ce = S.next_token_loss(*at_answers(STUDENT, LABELS)).item()
    for tau in (0.5, 2.0):
        loss, kl_value = sd_loss(lam=1.0, tau=tau)
        _, _, hand_kl = hand_loss(STUDENT, TEACHER, LABELS, 1.0, tau)
        assert (loss.item() - ce) == pytest.approx(tau**2 * hand_kl, rel=1e-4)
        assert (loss.item() - ce) != pytest.approx(hand_kl, rel=1e-2)  # without tau^2 it would be this


def test_self_distillation_zero_weight_is_cross_entropy():
    loss, _ = sd_loss(lam=0.0, tau=0.5)
    _, hand_ce, _ = hand_loss(STUDENT, TEACHER, LABELS, 0.0, 0.5)
    assert loss.item() == pytest.approx(hand_ce, rel=1e-6)
    assert loss.item() == pytest.approx(S.next_token_loss(*at_answers(STUDENT, LABELS)).item(), rel=1e-6)


def test_self_distillation_gradient_reaches_the_student_only():
    student = at_answers(STUDENT, LABELS)[0].requires_grad_(True)
    teacher = at_answers(TEACHER, LABELS)[0].requires_grad_(True)
    loss, _ = S.self_distillation_loss(student, teacher, at_answers(STUDENT, LABELS)[1], 1.0, 0.5)
    loss.backward()
    assert teacher.grad is None
    assert (student.grad.abs().sum(-1) > 0).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_answer_logits_are_the_full_forward_at_the_targets(arch):
    # train()'s output layer on the target positions alone gives the rows of the full forward pass there, and so do
    # the gradients; a model whose logits are not its output layer on its last hidden state takes the full forward.
    model = tiny_model(arch)
    batch = next(random_batches(model.config.vocab_size)(torch.Generator().manual_seed(0)))
    batch["attention_mask"][1, -2:] = 0  # padding (its labels stay: every target counts here)
    assert S.output_layer_separable(model, random_batches(model.config.vocab_size))
    fast, targets = S.answer_logits(model, batch, separable=True)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want_targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != -100]
    assert fast.shape == (len(want_targets), model.config.vocab_size) and torch.equal(targets, want_targets)
    torch.testing.assert_close(fast, full[batch["labels"][:, 1:] != -100], rtol=1e-5, atol=1e-5)
    grads = []
    for separable in (True, False):
        model.zero_grad()
        S.next_token_loss(*S.answer_logits(model, batch, separable)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    capped = tiny_model(arch)
    capped.register_forward_hook(lambda module, args, output: setattr(output, "logits", 3 * torch.tanh(output.logits)))
    assert not S.output_layer_separable(capped, random_batches(model.config.vocab_size))


# =====================================================================================================
# 4. Freezing by parameter group: GPT-2, Llama, Qwen2 and GPT-NeoX naming
# =====================================================================================================
N_LAYER = 12  # enough blocks that layers:1 must not catch blocks 10 and 11
TINY = dict(vocab_size=48, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_config(arch):
    if arch == "gpt2":
        return GPT2Config(n_layer=N_LAYER, n_embd=16, n_head=2, n_inner=32, vocab_size=48, n_positions=32,
                          tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    common = dict(num_hidden_layers=N_LAYER, hidden_size=16, num_attention_heads=2, intermediate_size=32, **TINY)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=1, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=1, **common)
    return GPTNeoXConfig(**common)


def tiny_model(arch, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch))


L = range(N_LAYER)
# The parameter names each group must pick, written out by hand from each architecture's module layout
EXPECTED = {
    "gpt2": {
        "attn": {f"transformer.h.{i}.attn.{m}.{w}" for i in L for m in ("c_attn", "c_proj") for w in ("weight", "bias")},
        "mlp": {f"transformer.h.{i}.mlp.{m}.{w}" for i in L for m in ("c_fc", "c_proj") for w in ("weight", "bias")},
        "embed": {"transformer.wte.weight", "transformer.wpe.weight"},  # lm_head is tied to wte
        "block": lambda i: f"transformer.h.{i}.",
    },
    "llama": {
        "attn": {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in L for m in "qkvo"},
        "mlp": {f"model.layers.{i}.mlp.{m}_proj.weight" for i in L for m in ("gate", "up", "down")},
        "embed": {"model.embed_tokens.weight", "lm_head.weight"},
        "block": lambda i: f"model.layers.{i}.",
    },
    "qwen2": {
        "attn": {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in L for m in "qkvo"}
        | {f"model.layers.{i}.self_attn.{m}_proj.bias" for i in L for m in "qkv"},
        "mlp": {f"model.layers.{i}.mlp.{m}_proj.weight" for i in L for m in ("gate", "up", "down")},
        "embed": {"model.embed_tokens.weight", "lm_head.weight"},
        "block": lambda i: f"model.layers.{i}.",
    },
    "gpt_neox": {
        "attn": {f"gpt_neox.layers.{i}.attention.{m}.{w}" for i in L for m in ("query_key_value", "dense") for w in ("weight", "bias")},
        "mlp": {f"gpt_neox.layers.{i}.mlp.{m}.{w}" for i in L for m in ("dense_h_to_4h", "dense_4h_to_h") for w in ("weight", "bias")},
        "embed": {"gpt_neox.embed_in.weight", "lm_head.weight"},
        "block": lambda i: f"gpt_neox.layers.{i}.",
    },
}
ARCHS = list(EXPECTED)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_set_trainable_picks_each_architectures_names(arch):
    model, want = tiny_model(arch), EXPECTED[arch]
    names = {n for n, _ in model.named_parameters()}
    for group in ("attn", "mlp", "embed"):
        chosen = S.set_trainable(model, group)
        assert set(chosen) == want[group], group
        assert trainable_names(model) == want[group], group  # and every other parameter is frozen
    assert set(S.set_trainable(model, "attn,mlp")) == want["attn"] | want["mlp"]
    assert set(S.set_trainable(model, "all")) == names == trainable_names(model)
    assert set(S.set_trainable(model, "layers:1")) == {n for n in names if n.startswith(want["block"](1))}
    assert set(S.set_trainable(model, "layers:0,11")) == {n for n in names if n.startswith((want["block"](0), want["block"](11)))}
    # a regular expression on the names: the final norm and nothing else
    outside_blocks = {n for n in names if not n.startswith(tuple(want["block"](i) for i in L))}
    final_norm = {n for n in outside_blocks if "norm" in n or "ln_f" in n}
    assert final_norm and set(S.set_trainable(model, r"(ln_f|final_layer_norm|model\.norm)\.")) == final_norm
    assert trainable_names(model) == final_norm


@pytest.mark.parametrize("spec", ["nothing_is_called_this", "layers:99", "layers:one", "attn("])
def test_set_trainable_rejects_what_matches_nothing(spec):
    model = tiny_model("llama")
    before = trainable_names(model)
    with pytest.raises(S.UserError, match="--trainable"):
        S.set_trainable(model, spec)
    assert trainable_names(model) == before  # a refused pattern changes nothing


def random_batches(vocab_size, n_batches=3, batch=4, length=10):
    """An epoch function of random token sequences; the first half of each is prompt (-100), as in QA."""
    def epoch(generator):
        for _ in range(n_batches):
            ids = torch.randint(2, vocab_size, (batch, length), generator=generator)
            labels = ids.clone()
            labels[:, : length // 2] = -100
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return epoch


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_frozen_and_moved(before, model, trainable):
    assert trainable
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} is trainable but did not move"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("group", ["attn", "mlp"])
def test_training_moves_only_the_trainable_group(arch, group):
    model = tiny_model(arch)
    trainable = set(S.set_trainable(model, group))
    before = snapshot(model)
    stats = S.train(model, random_batches(model.config.vocab_size), S.next_token_loss, epochs=1, lr=1e-2, cfg=S.Config(),
                    desc="test", weight_decay=0.1)  # weight decay must not touch frozen weights either
    assert stats["tokens"] == 3 * 4 * 10
    assert_frozen_and_moved(before, model, trainable)


def test_training_frees_a_steps_logits_before_the_next_forward():
    # The logits are [batch, positions, vocabulary]: kept alive into the next step, they would add one more such
    # tensor to every step's peak memory (36 MB at batch 16 with a 32k vocabulary, far more for a real LLM).
    model = tiny_model("llama")
    seen, alive_at_forward = [], []
    model.base_model.register_forward_pre_hook(  # train() runs the base model, then the output layer at the targets
        lambda module, args: alive_at_forward.append(any(ref() is not None for ref in seen)) if module.training else None)

    def loss_fn(logits, labels, batch):
        seen.append(weakref.ref(logits))
        return S.next_token_loss(logits, labels)
    S.train(model, random_batches(model.config.vocab_size), loss_fn, epochs=1, lr=1e-3, cfg=S.Config(), desc="test")
    assert len(alive_at_forward) == 3 and not any(alive_at_forward)


def test_a_tied_embedding_gets_the_same_gradient_without_a_second_vocabulary_wide_tensor():
    """train() makes a tied input embedding's gradient sparse: the same .grad as the dense one (a dense tensor, for
    the optimizer), while the embedding's own backward hands over a sparse tensor instead of a [V, d] one. An untied
    embedding is left dense (its gradient would otherwise reach the optimizer sparse)."""
    model = tiny_model("gpt2").eval()  # tied: wte is lm_head; eval: no dropout, so both passes are the same
    batch = next(random_batches(model.config.vocab_size)(torch.Generator().manual_seed(0)))
    grads, layouts = [], []  # layouts: whether the embedding's backward is sparse
    for sparse in (False, True):
        model.zero_grad(set_to_none=True)
        if sparse:
            S.sparse_tied_embedding_gradient(model)
        handle = model.get_input_embeddings().register_forward_hook(  # how the embedding's backward will run
            lambda module, args, out: layouts.append(out.grad_fn._saved_sparse))
        logits, targets = S.answer_logits(model, batch, separable=True)
        S.next_token_loss(logits, targets).backward()
        handle.remove()
        grads.append(model.get_input_embeddings().weight.grad.clone())
    assert layouts == [False, True]
    assert grads[1].layout == torch.strided and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    untied = tiny_model("llama")
    S.sparse_tied_embedding_gradient(untied)
    assert not untied.get_input_embeddings().sparse
    S.train(model, random_batches(model.config.vocab_size), S.next_token_loss, epochs=1, lr=1e-3, cfg=S.Config(), desc="t")
    assert model.get_input_embeddings().sparse  # train() takes this path


def test_training_on_the_smoke_world_moves_only_the_mlps(smoke_base):
    model = copy.deepcopy(smoke_base.model)
    trainable = set(S.set_trainable(model, "mlp"))
    assert trainable == {n for n, _ in model.named_parameters() if ".mlp." in n}
    before = snapshot(model)
    facts = smoke_base.facts[:40]
    S.train(model, S.qa_batches(smoke_base.tokenizer, facts, 16), S.next_token_loss, epochs=1, lr=1e-3, cfg=smoke_base.cfg, desc="test")
    assert_frozen_and_moved(before, model, trainable)


def test_qa_batches_target_only_the_answer(smoke_base):
    tok = smoke_base.tokenizer
    facts = smoke_base.facts[:5]
    batch = next(S.qa_batches(tok, facts, 5)(torch.Generator().manual_seed(0)))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    targets = set()
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(mask) - n) and all(y == -100 for y in labels[n:])  # right padding, no targets
        answer = [y for y in labels if y != -100]
        assert answer[-1] == tok.eos_token_id and labels[n - len(answer):n] == answer == ids[n - len(answer):n]
        targets.add(tok.decode(answer[:-1]))
        assert tok.decode(ids[:n - len(answer)]).startswith("Q: ") and tok.decode(ids[:n - len(answer)]).endswith("\nA:")
    assert targets == {" " + f["answers"][0] for f in facts}


def test_batched_greedy_answers_equal_one_at_a_time(smoke_base):
    """Left padding in batched generation must not change any answer."""
    facts = [f for f in smoke_base.facts if f["in_pretraining"]][:24]
    rng = random.Random(0)
    prompts = [S.few_shot_prompt(f, rng.sample(facts, 2)) for f in facts[:12]] + [S.QA_PROMPT.format(question=f["question"]) for f in facts[12:]]
    batched = S.generate_answers(smoke_base.model, smoke_base.tokenizer, prompts, max_new_tokens=6, batch_size=64)
    single = S.generate_answers(smoke_base.model, smoke_base.tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert all(len(a) == 1 and "\n" not in a[0] for a in batched)


# =====================================================================================================
# 4./6. Method losses on real models: the teacher gets no gradient; L2 pull by hand
# =====================================================================================================
@pytest.mark.parametrize("teacher_cache", ["live", "fp32"])
def test_selfdistill_method_loss_leaves_the_teacher_alone(smoke_base, teacher_cache):
    student = copy.deepcopy(smoke_base.model)
    S.set_trainable(student, "all")
    teacher = S.freeze_as_teacher(copy.deepcopy(smoke_base.model))
    cfg = replace(smoke_base.cfg, kl_weight=1.0, temperature=0.5, teacher_cache=teacher_cache)
    batches = S.qa_batches(smoke_base.tokenizer, smoke_base.facts[:16], 8)
    loss_fn = S.method_loss("selfdistill", student, teacher, cfg, batches)
    batch = batches.batch_of([3, 1, 4, 15, 9, 2, 6, 5])

    def loss_and_ce():
        logits, targets = S.answer_logits(student, batch, separable=False)
        return loss_fn(logits, targets, batch), S.next_token_loss(logits, targets).item()

    loss, ce = loss_and_ce()  # a student equal to its teacher: KL 0, the loss is the cross-entropy
    assert loss.item() == pytest.approx(ce, abs=1e-5)
    with torch.no_grad():
        student.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    loss, ce = loss_and_ce()
    assert loss.item() > ce + 1e-3  # now the KL term is positive
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_l2_pull_by_hand():
    student = tiny_model("gpt2")
    S.set_trainable(student, "all")
    loss_fn = S.method_loss("l2", student, None, S.Config(l2_weight=2.0))
    logits, labels = torch.randn(2, 48), torch.tensor([4, 5])
    assert loss_fn(logits, labels, None).item() == pytest.approx(S.next_token_loss(logits, labels).item(), abs=1e-6)
    with torch.no_grad():
        student.transformer.wte.weight[:3, :4] += 0.1  # 12 entries moved by 0.1: pull = 12 * 0.01
        student.transformer.h[0].mlp.c_fc.bias[:5] -= 0.2  # 5 entries by 0.2: pull = 5 * 0.04
    want = S.next_token_loss(logits, labels).item() + 2.0 * (12 * 0.01 + 5 * 0.04)
    assert loss_fn(logits, labels, None).item() == pytest.approx(want, rel=1e-4)


# =====================================================================================================
# 6. Stage 2 through run_method: the teacher is bit-identical afterwards; freeze trains only its group
# =====================================================================================================
@pytest.fixture(scope="module")
def stage2_setup(smoke_base):
    facts = smoke_base.facts
    known = [f for f in facts if f["in_pretraining"]]
    new = [f for f in facts if not f["in_pretraining"] and f["key"] == "name"]
    splits = {"known": known[:24], "unknown": new[:24], "held": known[24:40], "val": known[40:48]}
    eval_sets = {k: v[:12] for k, v in splits.items()}
    cfg = replace(smoke_base.cfg, epochs=2, batch_size=16, eval_batch_size=64)
    teacher = S.freeze_as_teacher(copy.deepcopy(smoke_base.model))
    teacher_scores = S.evaluate(teacher, smoke_base.tokenizer, eval_sets, cfg)
    return teacher, splits, eval_sets, teacher_scores, cfg


@pytest.mark.parametrize("method, trainable", [("selfdistill", None), ("freeze", "attn")])
def test_run_method_keeps_the_teacher_bit_identical(smoke_base, stage2_setup, method, trainable):
    teacher, splits, eval_sets, teacher_scores, cfg = stage2_setup
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result = S.run_method(method, trainable, teacher, smoke_base.tokenizer, splits, eval_sets, teacher_scores, cfg)
    after = teacher.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert [c["epoch"] for c in result["curve"]] == [0, 1, 2] and result["curve"][0] == {"epoch": 0, **teacher_scores}
    assert result["trainable"] == trainable
    attn = sum(p.numel() for n, p in teacher.named_parameters() if ".self_attn." in n)
    assert result["trainable_params"] == (attn if method == "freeze" else sum(p.numel() for p in teacher.parameters()))
    for key in ("known_acc", "unknown_acc", "held_acc"):
        assert 0.0 <= result["final"][key] <= 1.0
    held_before, held_after = teacher_scores["held_acc"], result["final"]["held_acc"]
    if held_before > 0:
        assert result["forgetting"] == pytest.approx((held_before - held_after) / held_before)


# =====================================================================================================
# 3. SliCK categories and the splits
# =====================================================================================================
@pytest.mark.parametrize("greedy, sampled, category", [
    ([True, True, True], [], "HighlyKnown"),
    ([True, False, True], [], "MaybeKnown"),
    ([False, False, True], [False] * 4, "MaybeKnown"),
    ([False, False, False], [False, True, False], "WeaklyKnown"),
    ([False, False, False], [False, False, False], "Unknown"),
    ([False, False, False], [], "Unknown"),
])
def test_slick_category(greedy, sampled, category):
    assert S.slick_category(greedy, sampled) == category


def slick_facts():
    """8 people, one relation. Who is what: P0, P4..P7 HighlyKnown; P1 MaybeKnown; P2 WeaklyKnown; P3 Unknown."""
    return [{"id": f"f{i}", "relation": "city", "subject": f"P{i}", "question": f"Where was P{i} born?", "answers": [f"City{i}"]}
            for i in range(8)]


def test_categorize_facts_gives_each_category(monkeypatch):
    facts = slick_facts()
    by_question = {f["question"]: f for f in facts}
    cfg = S.Config(slick_prompts=3, slick_shots=2, slick_samples=4, slick_temperature=0.5, slick_top_k=40)
    calls = {"greedy": [], "sampled": []}
    greedy_seen = {}

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, batch_size, num_samples=0, temperature=1.0, top_k=0, desc="",
                      prefill_once=True):
        out = []
        for prompt in prompts:
            fact = by_question[prompt.rsplit("Q: ", 1)[1].removesuffix("\nA:")]
            right, n = fact["answers"][0], int(fact["subject"][1:])
            if num_samples == 0:
                calls["greedy"].append(prompt)
                seen = greedy_seen[n] = greedy_seen.get(n, 0) + 1
                ok = n not in (1, 2, 3) or (n == 1 and seen == 2)  # P1: right on its second prompt only
                out.append([f"  {right.lower()}." if ok else "Nowhere"])  # normalisation must accept " city1."
            else:
                assert (temperature, top_k) == (0.5, 40)
                calls["sampled"].append(prompt)
                out.append(["Nowhere"] * (num_samples - 1) + [right if n == 2 else "Elsewhere"])
        return out

    monkeypatch.setattr(S, "generate_answers", fake_generate)
    monkeypatch.setattr(S, "max_answer_tokens", lambda tokenizer, facts: 4)
    categories = S.categorize_facts(None, None, facts, cfg, random.Random(0))
    assert categories == {"f0": "HighlyKnown", "f1": "MaybeKnown", "f2": "WeaklyKnown", "f3": "Unknown",
                          "f4": "HighlyKnown", "f5": "HighlyKnown", "f6": "HighlyKnown", "f7": "HighlyKnown"}
    assert len(calls["greedy"]) == 8 * 3
    # sampling is spent only on the facts greedy never got right (P2, P3), on their own prompts
    assert sorted(p.rsplit("Q: ", 1)[1] for p in calls["sampled"]) == ["Where was P2 born?\nA:"] * 3 + ["Where was P3 born?\nA:"] * 3
    for prompt in calls["greedy"]:  # slick_shots exemplars of the relation, never the asked person
        blocks = prompt.split("\n\n")
        asked = by_question[blocks[-1].removeprefix("Q: ").removesuffix("\nA:")]
        assert len(blocks) == 3 and blocks[-1] == S.QA_PROMPT.format(question=asked["question"])
        for shot in blocks[:-1]:
            question, answer = shot.removeprefix("Q: ").split("\nA: ")
            assert by_question[question]["answers"] == [answer] and by_question[question]["subject"] != asked["subject"]


def test_cached_categories_are_reused(monkeypatch, tmp_path):
    facts = slick_facts()
    cfg = S.Config(cache_dir=str(tmp_path / "cache"), slick_prompts=2, slick_shots=1, slick_samples=0)
    folders = {}
    for name, seed in (("model-a", 0), ("model-b", 1)):  # two models: other weights, same config
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / name)
        folders[name] = tmp_path / name
    model = AutoModelForCausalLM.from_pretrained(folders["model-a"])
    monkeypatch.setattr(S, "max_answer_tokens", lambda tokenizer, facts: 4)
    monkeypatch.setattr(S, "generate_answers", lambda model, tok, prompts, **kw: [["City0"] for _ in prompts])
    first = S.cached_categories(model, None, facts, cfg, folders["model-a"])
    assert first["f0"] == "HighlyKnown" and first["f1"] == "Unknown"

    def must_not_run(*args, **kwargs):
        raise AssertionError("categories were recomputed instead of read from the cache")
    monkeypatch.setattr(S, "generate_answers", must_not_run)
    assert S.cached_categories(model, None, facts, cfg, folders["model-a"]) == first
    with pytest.raises(AssertionError, match="recomputed"):  # another model is another cache entry
        S.cached_categories(model, None, facts, cfg, folders["model-b"])


def split_world(n_people=60):
    """3 facts per person. Person i: i % 3 == 0 all HighlyKnown; == 1 MaybeKnown, WeaklyKnown, Unknown; == 2 all Unknown.
    One fact (of person 1) was never categorised."""
    facts, categories = [], {}
    kinds = {0: ["HighlyKnown"] * 3, 1: ["MaybeKnown", "WeaklyKnown", "Unknown"], 2: ["Unknown"] * 3}
    for i in range(n_people):
        for r, category in enumerate(kinds[i % 3]):
            fact = {"id": f"f{i}-{r}", "relation": f"r{r}", "subject": f"P{i}", "question": f"r{r} of P{i}?", "answers": ["x"]}
            facts.append(fact)
            categories[fact["id"]] = category
    del categories["f1-0"]
    return facts, categories


def test_split_facts_disjoint_by_entity():
    facts, categories = split_world()
    cfg = S.Config(n_held=12, n_val=5, n_known=20, n_unknown=25)
    splits = S.split_facts(facts, categories, cfg, random.Random(0))
    assert {k: len(v) for k, v in splits.items()} == {"held": 12, "val": 5, "known": 20, "unknown": 25}
    ids = [f["id"] for v in splits.values() for f in v]
    assert len(ids) == len(set(ids)) and "f1-0" not in ids
    people = {k: {f["subject"] for f in v} for k, v in splits.items()}
    train = people["known"] | people["unknown"]
    assert not (people["held"] & train) and not (people["val"] & train) and not (people["held"] & people["val"])
    assert all(categories[f["id"]] == "HighlyKnown" for f in splits["held"])
    assert all(categories[f["id"]] != "Unknown" for f in splits["known"] + splits["val"])
    assert all(categories[f["id"]] == "Unknown" for f in splits["unknown"])
    assert S.split_facts(facts, categories, cfg, random.Random(0)) == splits  # the seed decides
    assert S.split_facts(facts, categories, cfg, random.Random(1)) != splits


def test_split_facts_zero_means_all():
    facts, categories = split_world()
    splits = S.split_facts(facts, categories, S.Config(n_held=6, n_val=3, n_known=0, n_unknown=0), random.Random(0))
    untrained = {f["subject"] for f in splits["held"] + splits["val"]}
    assert sorted(f["id"] for f in splits["unknown"]) == sorted(
        f["id"] for f in facts if f["subject"] not in untrained and categories.get(f["id"]) == "Unknown")
    assert sorted(f["id"] for f in splits["known"]) == sorted(
        f["id"] for f in facts if f["subject"] not in untrained and categories.get(f["id"], "Unknown") != "Unknown")


@pytest.mark.parametrize("sizes, split", [(dict(n_held=61), "held"), (dict(n_unknown=200), "unknown"),
                                          (dict(n_known=100), "known"), (dict(n_val=100), "val")])
def test_split_facts_too_small_raises(sizes, split):
    facts, categories = split_world()
    cfg = S.Config(**{**dict(n_held=6, n_val=3, n_known=10, n_unknown=10), **sizes})
    with pytest.raises(S.UserError, match=f"for the {split} split.*--n_{split}"):
        S.split_facts(facts, categories, cfg, random.Random(0))


def test_kv_heads_make_a_grouped_query_model_with_its_own_cache_key():
    """--n_kv_head builds grouped-query attention (as in Qwen2.5 and Llama 3); it is a different base model, so a
    different cache key, while 0 and n_head (one key/value head per query head) are the same model."""
    tokenizer = S.train_tokenizer(["Berga Tolomi was born in Oslo."] * 4, vocab_size=300)
    world = {"fingerprint": "f"}
    cfg = S.parse_config(["--preset", "smoke", "--n_kv_head", "1"])
    model = AutoModelForCausalLM.from_config(S.make_model_config(cfg, tokenizer))
    head_dim = cfg.n_embd // cfg.n_head
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (1 * head_dim, cfg.n_embd)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (cfg.n_head * head_dim, cfg.n_embd)
    keys = {kv: S.base_model_key(replace(cfg, n_kv_head=kv), world) for kv in (0, cfg.n_head, 1)}
    assert keys[0] == keys[cfg.n_head] != keys[1]

"""The fast self-distillation paths equal the plain Eq. 1-2 function: the chunked KL, the cached teacher (hidden
states and fp32 exact, bf16 and top-k within their stated tolerances), in any batch order and with padding; and the teacher
cache gives each example its own rows."""
import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sftguard as S  # noqa: E402


def random_batch(batch=5, positions=9, vocab=300, seed=0, scale=3.0):
    """Student and teacher logits of the answer tokens [N, V] and their targets [N], as train() gives them the losses,
    from a batch with a prompt, right padding of different lengths and one row without answer."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, positions, vocab, generator=g) * scale
    teacher = torch.randn(batch, positions, vocab, generator=g) * scale
    labels = torch.randint(0, vocab, (batch, positions), generator=g)
    labels[:, :4] = -100  # prompt
    labels[0, 7:] = -100  # padding
    labels[3, 5:] = -100
    labels[4, :] = -100  # a row with no answer token at all
    answer = labels != -100
    return student[answer], teacher[answer], labels[answer]


def teacher_rows(teacher_logits, labels, temperature):
    """log p_teacher^tau of the answer tokens: of [N, V] logits, or of [batch, positions, V] ones at labels != -100."""
    return F.log_softmax((teacher_logits if labels.dim() == 1 else teacher_logits[labels != -100]).float() / temperature, dim=-1)


def topk_rows(log_p, k):
    top, ids = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, tail], dim=-1), ids


def loss_and_grad(fn, student, *args, **kwargs):
    student = student.clone().requires_grad_(True)
    loss, kl = fn(student, *args, **kwargs)
    loss.backward()
    return loss.detach(), kl.detach(), student.grad


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_kl_equals_plain_loss_and_gradient(temperature, chunk):
    student, teacher, labels = random_batch()
    ref = loss_and_grad(S.self_distillation_loss, student, teacher, labels, 1.3, temperature)
    fast = loss_and_grad(S.self_distillation_loss_chunked, student, teacher_rows(teacher, labels, temperature), labels,
                         1.3, temperature, chunk)
    assert fast[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert fast[1].item() == pytest.approx(ref[1].item(), rel=1e-5)
    assert torch.allclose(fast[2], ref[2], atol=1e-7, rtol=1e-4)


def test_chunked_loss_keeps_one_full_vocabulary_tensor_for_backward():
    """Autograd saves several N x V tensors for the plain loss; the chunked one keeps only its gradient, as
    plain cross-entropy keeps its log-probabilities."""
    student, teacher, labels = random_batch(vocab=500)
    log_p_teacher = teacher_rows(teacher, labels, 0.5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        S.ChunkedSelfDistillation.apply(student.clone().requires_grad_(True), labels, log_p_teacher, None, None, 1.0, 0.5, 4)
    assert [t.shape for t in saved] == [student.shape]  # the gradient, nothing else
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        S.self_distillation_loss(student.clone().requires_grad_(True), teacher, labels, 1.0, 0.5)
    assert sum(t.numel() for t in saved if t.dim() and t.shape[-1] == 500) >= 3 * student.numel()


def test_chunked_loss_gradient_follows_the_outer_gradient_and_dtype():
    """The gradient is computed in the forward pass and only scaled in the backward one: a loss used as 3 * loss
    gets three times the gradient, and bfloat16 logits get a bfloat16 gradient."""
    student, teacher, labels = random_batch()
    rows = teacher_rows(teacher, labels, 0.5)
    once = loss_and_grad(S.self_distillation_loss_chunked, student, rows, labels, 1.0, 0.5, 3)[2]
    tripled = loss_and_grad(lambda *a: [3 * x for x in S.self_distillation_loss_chunked(*a)], student, rows, labels,
                            1.0, 0.5, 3)[2]
    assert torch.allclose(tripled, 3 * once, rtol=1e-6, atol=1e-9)
    half = loss_and_grad(S.self_distillation_loss_chunked, student.bfloat16(), rows, labels, 1.0, 0.5, 3)[2]
    rounded = loss_and_grad(S.self_distillation_loss_chunked, student.bfloat16().float(), rows, labels, 1.0, 0.5, 3)[2]
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), rounded, rtol=1e-2, atol=1e-5)


def test_topk_with_every_token_is_the_full_kl():
    student, teacher, labels = random_batch(vocab=64)
    log_p = teacher_rows(teacher, labels, 0.5)
    ref = loss_and_grad(S.self_distillation_loss, student, teacher, labels, 1.0, 0.5)
    top, ids = topk_rows(log_p, 64)
    fast = loss_and_grad(S.self_distillation_loss_chunked, student, top, labels, 1.0, 0.5, 4, ids.int())
    assert fast[0].item() == pytest.approx(ref[0].item(), rel=1e-5)
    assert torch.allclose(fast[2], ref[2], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 10])
def test_topk_gradient_is_that_of_the_kl_over_k_plus_one_bins(k):
    """The hand-written gradient (p_student - q) / tau equals autograd's on KL over (top-k tokens, tail)."""
    student, teacher, labels = random_batch(vocab=50)
    tau = 0.5
    top, ids = topk_rows(teacher_rows(teacher, labels, tau), k)
    fast = loss_and_grad(S.self_distillation_loss_chunked, student, top, labels, 1.0, tau, 3, ids)

    def bins(student_logits, labels, kl_weight, temperature):
        log_q = F.log_softmax(student_logits / temperature, -1)
        log_q_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
        kl = ((top[:, :-1].exp() * (top[:, :-1] - log_q.gather(-1, ids))).sum(-1)
              + top[:, -1].exp() * (top[:, -1] - log_q_tail)).mean()
        return F.cross_entropy(student_logits, labels) + kl_weight * temperature**2 * kl, kl
    ref = loss_and_grad(bins, student, labels, 1.0, tau)
    assert fast[1].item() == pytest.approx(ref[1].item(), rel=1e-5)
    assert torch.allclose(fast[2], ref[2], atol=1e-7, rtol=1e-4)


def test_cached_rows_of_other_examples_are_refused():
    student, teacher, labels = random_batch()
    log_p = teacher_rows(teacher, labels, 0.5)
    with pytest.raises(RuntimeError, match="teacher cache"):
        S.self_distillation_loss_chunked(student, log_p[:-1], labels, 1.0, 0.5, 8)


# =====================================================================================================
# The teacher cache on a real model: rows map to their examples, in any batch order
# =====================================================================================================
@pytest.fixture(scope="module")
def models(smoke_base):
    """The smoke base model as the teacher; a student that differs from it, so the KL is not zero."""
    teacher = S.freeze_as_teacher(copy.deepcopy(smoke_base.model))
    student = copy.deepcopy(smoke_base.model)
    S.set_trainable(student, "all")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    facts = [f for f in smoke_base.facts if f.get("key") != "uuid"][:40]
    return teacher, student, smoke_base.tokenizer, facts, smoke_base.cfg


def test_teacher_cache_rows_are_each_examples_own(models):
    teacher, _, tokenizer, facts, cfg = models
    batches = S.qa_batches(tokenizer, facts, 8)
    cache = S.build_teacher_cache(teacher, batches, replace(cfg, batch_size=7), "fp32")
    counts = [int((batches.batch_of([i])["labels"][0, 1:] != -100).sum()) for i in range(len(facts))]
    assert [end - start for start, end in zip(cache["offsets"], cache["offsets"][1:])] == counts
    assert cache["offsets"][-1] == len(cache["rows"]) == batches.answer_tokens
    for i in (0, 5, len(facts) - 1):  # alone, unpadded: the same rows
        one = batches.batch_of([i])
        with torch.no_grad():
            logits = teacher(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits[:, :-1]
        rows = cache["rows"][cache["offsets"][i]:cache["offsets"][i + 1]]
        assert torch.allclose(rows, teacher_rows(logits, one["labels"][:, 1:], cfg.temperature), atol=1e-5)
    for epoch in range(2):  # random order and right padding: the gathered rows are this batch's live rows
        for batch in batches(torch.Generator().manual_seed(epoch)):
            with torch.no_grad():
                logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            log_p, ids = S.cached_teacher_rows(cache, batch["index"])
            assert ids is None
            assert torch.allclose(log_p, teacher_rows(logits, batch["labels"][:, 1:], cfg.temperature), atol=1e-5)


def epoch_losses_and_grads(student, teacher, batches, cfg):
    """Loss of every batch of one random-order epoch and the summed gradient, through method_loss."""
    loss_fn = S.method_loss("selfdistill", student, teacher, cfg, batches)
    student.zero_grad()
    losses = []
    for batch in batches(torch.Generator().manual_seed(3)):
        loss = loss_fn(*S.answer_logits(student, batch, separable=False), batch)
        loss.backward()
        losses.append(loss.item())
    return torch.tensor(losses), torch.cat([p.grad.flatten() for p in student.parameters()])


@pytest.mark.parametrize("mode,loss_rtol,grad_rtol", [("live", 1e-5, 1e-4), ("hidden", 1e-5, 1e-4), ("fp32", 1e-5, 1e-4), ("bf16", 1e-3, 1e-2),
                                                     ("topk", 1e-2, 0.1)])
def test_fast_method_loss_equals_plain(models, mode, loss_rtol, grad_rtol):
    """Against the plain Eq. 1-2 function with a live teacher, the stated tolerances: live chunked and fp32 cache
    and the hidden-state and fp32 caches exact (float rounding), bf16 loss within 0.1% and gradient within 1%, top-64 loss within 1% and gradient
    within 10% (relative norm)."""
    teacher, student, tokenizer, facts, cfg = models
    batches = S.qa_batches(tokenizer, facts, 8)
    live_losses, live_grad = epoch_losses_and_grads(student, teacher, batches, replace(cfg, teacher_cache="live", kl_chunk=0))
    losses, grad = epoch_losses_and_grads(student, teacher, batches, replace(cfg, teacher_cache=mode, teacher_topk=64, kl_chunk=5))
    assert torch.allclose(losses, live_losses, rtol=loss_rtol, atol=0)
    assert ((grad - live_grad).norm() / live_grad.norm()).item() < grad_rtol


def test_hidden_cache_rows_are_the_teachers_last_hidden_states(models):
    """Each batch's cached rows are the live teacher's last hidden states at its answer tokens plus the log-normaliser
    of its logits at tau: through the output layer (a copy, unscaled) and / tau, they give its log-probabilities at tau."""
    teacher, _, tokenizer, facts, cfg = models
    batches = S.qa_batches(tokenizer, facts, 8)
    cache = S.build_teacher_cache(teacher, batches, replace(cfg, batch_size=7, temperature=0.7), "hidden")
    assert cache["rows"].shape == (batches.answer_tokens, teacher.config.hidden_size + 1)
    weight = teacher.get_output_embeddings().weight
    assert cache["head"][0].data_ptr() != weight.data_ptr() and torch.equal(cache["head"][0], weight)
    for batch in batches(torch.Generator().manual_seed(1)):
        with torch.no_grad():
            logits, hidden = S.teacher_forward_with_hidden(teacher, batch)
        answer = batch["labels"][:, 1:] != -100
        rows, ids = S.cached_teacher_rows(cache, batch["index"])
        assert ids is None
        assert torch.equal(rows[:, :-1], hidden[:, :-1][answer])
        log_q = F.linear(rows[:, :-1], *cache["head"]) / 0.7 - rows[:, -1:]
        assert torch.allclose(log_q, F.log_softmax(logits[:, :-1][answer] / 0.7, -1), atol=1e-4)  # matmuls of other shapes


def scaled_logits(model, factor=2.0):
    """A model whose logits are not its output layer on its last hidden state (like Gemma 2's soft-capping)."""
    def rescale(module, args, kwargs, output):
        output.logits = output.logits * factor
        return output
    model.register_forward_hook(rescale, with_kwargs=True)
    return model


def test_auto_caches_hidden_states_else_fp32_when_the_cache_fits_else_runs_the_teacher_live(models):
    teacher, _, tokenizer, facts, cfg = models
    batches = S.qa_batches(tokenizer, facts, 8)
    assert S.teacher_cache_mode(teacher, batches, replace(cfg, teacher_cache="auto")) == "hidden"
    teacher = scaled_logits(copy.deepcopy(teacher))
    with pytest.raises(S.UserError, match="not its output layer"):
        S.teacher_cache_mode(teacher, batches, replace(cfg, teacher_cache="hidden"))
    row_bytes = teacher.get_output_embeddings().weight.shape[0] * 4
    fits = -(-batches.answer_tokens * row_bytes // 2**20)  # MiB, rounded up
    assert S.teacher_cache_mode(teacher, batches, replace(cfg, teacher_cache="auto", teacher_cache_max_mb=fits)) == "fp32"
    assert S.teacher_cache_mode(teacher, batches, replace(cfg, teacher_cache="auto", teacher_cache_max_mb=fits - 1)) == "live"
    assert S.teacher_cache_mode(teacher, None, replace(cfg, teacher_cache="auto")) == "live"  # nothing to cache
    assert S.teacher_cache_mode(teacher, batches, replace(cfg, teacher_cache="topk")) == "topk"


def test_live_teacher_runs_its_output_layer_on_answer_tokens_only(models):
    """A live teacher stops at its last hidden states (its output layer is applied to the answer tokens inside the
    loss), and gives the plain loss; a teacher whose logits are not its output layer on them runs whole."""
    teacher, student, tokenizer, facts, cfg = models
    batches = S.qa_batches(tokenizer, facts, 8)
    live = replace(cfg, teacher_cache="live", kl_chunk=4, temperature=0.7)
    assert S.output_layer_separable(teacher, batches)
    calls = []
    hook = teacher.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    try:
        loss_fn = S.method_loss("selfdistill", student, teacher, live, batches)
        calls.clear()  # the setup's checks run it on one example
        batch = batches.batch_of([0, 1, 2, 3])
        logits, targets = S.answer_logits(student, batch, separable=False)
        loss = loss_fn(logits, targets, batch)
    finally:
        hook.remove()
    assert calls == []
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    answer = batch["labels"][:, 1:] != -100
    plain = S.self_distillation_loss(logits, teacher_logits[answer], targets, cfg.kl_weight, 0.7)[0]
    assert torch.allclose(loss, plain, rtol=1e-5)
    scaled = scaled_logits(copy.deepcopy(teacher))
    assert not S.output_layer_separable(scaled, batches)
    loss_fn = S.method_loss("selfdistill", student, scaled, live, batches)
    with torch.no_grad():
        scaled_teacher_logits = scaled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    plain = S.self_distillation_loss(logits, scaled_teacher_logits[answer], targets, cfg.kl_weight, 0.7)[0]
    assert torch.allclose(loss_fn(logits, targets, batch), plain, rtol=1e-5)


@pytest.mark.parametrize("mode", ["hidden", "fp32"])
def test_cached_loss_does_not_hold_the_teacher(models, mode):
    """With a cached teacher the training loss needs only the cache: the teacher can be freed, and changing its
    weights afterwards changes nothing."""
    teacher, student, tokenizer, facts, cfg = models
    teacher = copy.deepcopy(teacher)
    batches = S.qa_batches(tokenizer, facts, 8)
    loss_fn = S.method_loss("selfdistill", student, teacher, replace(cfg, teacher_cache=mode), batches)
    assert not any(c.cell_contents is teacher for c in loss_fn.__closure__)
    batch = batches.batch_of([0, 1, 2])
    logits, targets = S.answer_logits(student, batch, separable=True)
    before = loss_fn(logits, targets, batch).item()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0)
    assert loss_fn(logits, targets, batch).item() == before


@pytest.mark.parametrize("flags", [["--teacher_cache", "fp16"], ["--kl_chunk", "-1"], ["--kl_chunk", "0"], ["--teacher_topk", "0"]])
def test_bad_fast_distillation_flags_are_user_errors(flags):
    with pytest.raises(S.UserError):
        S.parse_config(["--preset", "smoke", *flags])


def test_loss_runs_teacher_only_for_a_live_self_distillation_teacher(models):
    """What teacher_off_device reads: a cached teacher, sft and l2 leave the teacher idle; a live one runs every step."""
    teacher, _, tokenizer, facts, cfg = models
    batches = S.qa_batches(tokenizer, facts, 8)
    assert not S.loss_runs_teacher("selfdistill", teacher, batches, replace(cfg, teacher_cache="auto", kl_chunk=32))
    assert not S.loss_runs_teacher("selfdistill", teacher, batches, replace(cfg, teacher_cache="fp32", kl_chunk=32))
    assert S.loss_runs_teacher("selfdistill", teacher, batches, replace(cfg, teacher_cache="live", kl_chunk=32))
    assert S.loss_runs_teacher("selfdistill", teacher, batches, replace(cfg, teacher_cache="auto", kl_chunk=0))
    assert not any(S.loss_runs_teacher(m, teacher, batches, replace(cfg, kl_chunk=0)) for m in ("sft", "l2", "freeze"))

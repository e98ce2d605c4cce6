"""Checks any implementation of the self-distillation loss (Eq. 1-2) against hand-computed values and the reference.

    python -m pytest -q tests/test_student_loss.py                                         # sftguard's own
    SFTGUARD_LOSS=path/to/student.py:my_loss python -m pytest -q tests/test_student_loss.py  # a student's

The function must have sftguard's signature:
    self_distillation_loss(student_logits, teacher_logits, labels, kl_weight, temperature) -> (loss, kl)
logits: (batch, positions, vocab), already shifted so that position t predicts labels[:, t]; labels: (batch,
positions) with -100 where there is no answer token; loss = CE(gold, student at tau=1) + kl_weight * tau^2 * kl,
kl = KL(teacher_tau || student_tau) summed over the vocabulary and averaged over all answer tokens of the batch.

Each check is a plain function, so the last test can show that every check catches a typical mistake.
"""
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sftguard  # noqa: E402

REFERENCE = sftguard.self_distillation_loss
LN = math.log


def load_loss_under_test():
    """SFTGUARD_LOSS=path.py:function selects a student's implementation; unset: sftguard's own."""
    spec = os.environ.get("SFTGUARD_LOSS", "").strip()
    if not spec:
        return REFERENCE
    path, _, name = spec.rpartition(":")
    if not path or not name or not Path(path).is_file():
        pytest.fail(f"SFTGUARD_LOSS={spec!r}: write it as path/to/file.py:function_name (the file must exist)", pytrace=False)
    module_spec = importlib.util.spec_from_file_location("student_loss_module", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, name, None)):
        pytest.fail(f"SFTGUARD_LOSS={spec!r}: {path} defines no function {name!r}", pytrace=False)
    return getattr(module, name)


@pytest.fixture(scope="module")
def loss_fn():
    return load_loss_under_test()


def call(fn, student, teacher, labels, kl_weight, temperature):
    loss, kl = fn(student, teacher, labels, kl_weight, temperature)
    return float(loss.detach()), float(kl.detach())


# One position, vocabulary of 2. Teacher logits (0, 0): p = (1/2, 1/2). Student logits (ln 3, 0): q = (3/4, 1/4).
# Gold token 0. At tau = 1/2 the student's softened logits are (2 ln 3, 0): q_tau = (9/10, 1/10).
def one_position():
    student = torch.tensor([[[LN(3), 0.0]]])
    teacher = torch.tensor([[[0.0, 0.0]]])
    labels = torch.tensor([[0]])
    return student, teacher, labels


def check_hand_values_tau1(fn):
    # CE = -ln(3/4); KL(p || q) = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3)
    loss, kl = call(fn, *one_position(), kl_weight=1.0, temperature=1.0)
    assert kl == pytest.approx(0.5 * LN(4 / 3), abs=1e-6), "kl at tau=1 should be KL(teacher || student) = 1/2 ln(4/3)"
    assert loss == pytest.approx(LN(4 / 3) + 0.5 * LN(4 / 3), abs=1e-6), "loss at lambda=1, tau=1 should be CE + KL"


def check_hand_values_tau_half(fn):
    # KL(p || q_tau) = 1/2 ln((1/2)/(9/10)) + 1/2 ln((1/2)/(1/10)) = 1/2 ln(25/9) = ln(5/3).
    # The CE stays at tau = 1 (-ln 3/4, not -ln 9/10) and the KL is scaled by lambda * tau^2 = 2 * 1/4.
    loss, kl = call(fn, *one_position(), kl_weight=2.0, temperature=0.5)
    assert kl == pytest.approx(LN(5 / 3), abs=1e-6), "kl must compare both distributions softened at tau (returned unscaled)"
    assert loss == pytest.approx(LN(4 / 3) + 2.0 * 0.25 * LN(5 / 3), abs=1e-6), \
        "loss = CE(gold, student at tau=1) + lambda * tau^2 * KL(teacher_tau || student_tau)"


def check_forward_direction(fn):
    # The reverse KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308 differs from the forward 1/2 ln(4/3) = 0.1438.
    _, kl = call(fn, *one_position(), kl_weight=1.0, temperature=1.0)
    assert abs(kl - (0.75 * LN(1.5) + 0.25 * LN(0.5))) > 1e-3, "this is KL(student || teacher); the paper's is KL(teacher || student)"


def check_masking_and_token_mean(fn):
    # Two sequences, three positions. "a": teacher (0,0), student (ln 3, 0) -> KL 1/2 ln(4/3), CE ln(4/3).
    # "b": teacher = student = (0,0) -> KL 0, CE ln 2. Masked positions (-100) carry absurd logits that must not count.
    a_s, a_t, b, junk = [LN(3), 0.0], [0.0, 0.0], [0.0, 0.0], [50.0, -50.0]
    student = torch.tensor([[junk, a_s, a_s], [junk, junk, b]])
    teacher = torch.tensor([[[-50.0, 50.0], a_t, a_t], [[-50.0, 50.0], [-50.0, 50.0], b]])
    labels = torch.tensor([[-100, 0, 0], [-100, -100, 0]])
    loss, kl = call(fn, student, teacher, labels, kl_weight=1.0, temperature=1.0)
    # averaged over the 3 answer tokens of the batch (not per sequence, which would give ln(4/3)/4)
    assert kl == pytest.approx(LN(4 / 3) / 3, abs=1e-6), "kl must be averaged over all answer tokens of the batch, masked ones excluded"
    assert loss == pytest.approx((2 * LN(4 / 3) + LN(2)) / 3 + LN(4 / 3) / 3, abs=1e-6), "CE must also skip the -100 positions"


def random_batch(seed, batch=3, positions=5, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, positions, vocab, generator=g) * 3
    teacher = torch.randn(batch, positions, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (batch, positions), generator=g)
    labels[:, :2] = -100  # the prompt
    labels[0, -1] = -100  # padding
    return student, teacher, labels


def check_zero_weight_is_ce(fn):
    student, teacher, labels = random_batch(1)
    loss, _ = call(fn, student, teacher, labels, kl_weight=0.0, temperature=0.5)
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert loss == pytest.approx(float(ce), abs=1e-5), "with lambda = 0 the loss must be the plain cross-entropy"


def check_identical_models_have_zero_kl(fn):
    student, _, labels = random_batch(2)
    _, kl = call(fn, student, student.clone(), labels, kl_weight=1.0, temperature=0.5)
    assert abs(kl) < 1e-6, "a student equal to its teacher must have KL 0"


def check_matches_reference_and_gradient(fn):
    for seed, kl_weight, temperature in ((3, 1.0, 0.5), (4, 4.0, 2.0), (5, 0.25, 1.0)):
        student, teacher, labels = random_batch(seed)
        mine = student.clone().requires_grad_(True)
        ref = student.clone().requires_grad_(True)
        loss, kl = fn(mine, teacher, labels, kl_weight, temperature)
        ref_loss, ref_kl = REFERENCE(ref, teacher, labels, kl_weight, temperature)
        assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5), f"loss differs from the reference at lambda={kl_weight}, tau={temperature}"
        assert float(kl.detach()) == pytest.approx(float(ref_kl.detach()), rel=1e-5), f"kl differs from the reference at lambda={kl_weight}, tau={temperature}"
        loss.backward()
        ref_loss.backward()
        assert mine.grad is not None, "the loss must be differentiable with respect to the student's logits"
        assert torch.allclose(mine.grad, ref.grad, atol=1e-6), "the gradient on the student's logits differs from the reference"
        assert mine.grad[labels == -100].abs().max() == 0, "positions without an answer token must get no gradient"


CHECKS = [check_hand_values_tau1, check_hand_values_tau_half, check_forward_direction, check_masking_and_token_mean,
          check_zero_weight_is_ce, check_identical_models_have_zero_kl, check_matches_reference_and_gradient]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_loss(loss_fn, check):
    check(loss_fn)


# Typical mistakes; each must fail at least one check, or the checks would let it pass.
def _parts(student, teacher, labels, temperature):
    answer = labels != -100
    s, t = student[answer].float(), teacher[answer].float()
    return F.cross_entropy(s, labels[answer]), F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1), answer


def reverse_kl(student, teacher, labels, kl_weight, temperature):
    ce, log_p, log_q, _ = _parts(student, teacher, labels, temperature)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    return ce + kl_weight * temperature**2 * kl, kl


def no_tau_squared(student, teacher, labels, kl_weight, temperature):
    ce, log_p, log_q, _ = _parts(student, teacher, labels, temperature)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return ce + kl_weight * kl, kl


def ce_at_tau(student, teacher, labels, kl_weight, temperature):
    _, log_p, log_q, answer = _parts(student, teacher, labels, temperature)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return F.cross_entropy(student[answer] / temperature, labels[answer]) + kl_weight * temperature**2 * kl, kl


def unsoftened_kl(student, teacher, labels, kl_weight, temperature):
    ce, log_p, log_q, _ = _parts(student, teacher, labels, 1.0)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return ce + kl_weight * temperature**2 * kl, kl


def per_sequence_mean(student, teacher, labels, kl_weight, temperature):
    answer = labels != -100
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    log_q = F.log_softmax(student.float() / temperature, -1)
    token_kl = (log_p.exp() * (log_p - log_q)).sum(-1) * answer
    kl = (token_kl.sum(1) / answer.sum(1)).mean()
    ce = F.cross_entropy(student[answer], labels[answer])
    return ce + kl_weight * temperature**2 * kl, kl


def kl_over_all_positions(student, teacher, labels, kl_weight, temperature):
    answer = labels != -100
    log_p = F.log_softmax(teacher.float() / temperature, -1)
    log_q = F.log_softmax(student.float() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return F.cross_entropy(student[answer], labels[answer]) + kl_weight * temperature**2 * kl, kl


@pytest.mark.parametrize("wrong", [reverse_kl, no_tau_squared, ce_at_tau, unsoftened_kl, per_sequence_mean, kl_over_all_positions],
                         ids=lambda f: f.__name__)
def test_checks_catch_a_typical_mistake(wrong):
    failed = []
    for check in CHECKS:
        try:
            check(wrong)
        except AssertionError:
            failed.append(check.__name__)
    assert failed, f"no check caught {wrong.__name__}"

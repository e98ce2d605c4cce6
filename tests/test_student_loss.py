"""Checks any implementation of the self-distillation loss (Eq. 1-2) against hand-computed values and the reference.

    python -m pytest -q tests/test_student_loss.py                                         # sftguard's own
    SFTGUARD_LOSS=path/to/student.py:my_loss python -m pytest -q tests/test_student_loss.py  # a student's

The function must have sftguard's signature:
    self_distillation_loss(student_logits, teacher_logits, targets, kl_weight, temperature) -> (loss, kl)
logits: (N, vocab), the logits at the N answer tokens of a batch (sftguard's train() runs the output layer on those
positions only); targets: (N,) the gold tokens; loss = CE(gold, student at tau=1) + kl_weight * tau^2 * kl,
kl = KL(teacher_tau || student_tau) summed over the vocabulary and averaged over the N answer tokens.

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
    student = torch.tensor([[LN(3), 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])
    labels = torch.tensor([0])
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


def check_token_mean(fn):
    # Three answer tokens. Two "a": teacher (0,0), student (ln 3, 0) -> KL 1/2 ln(4/3), CE ln(4/3).
    # One "b": teacher = student = (0,0) -> KL 0, CE ln 2.
    a_s, a_t, b = [LN(3), 0.0], [0.0, 0.0], [0.0, 0.0]
    student, teacher, labels = torch.tensor([a_s, a_s, b]), torch.tensor([a_t, a_t, b]), torch.tensor([0, 0, 0])
    loss, kl = call(fn, student, teacher, labels, kl_weight=1.0, temperature=1.0)
    assert kl == pytest.approx(LN(4 / 3) / 3, abs=1e-6), "kl must be summed over the vocabulary and averaged over the answer tokens"
    assert loss == pytest.approx((2 * LN(4 / 3) + LN(2)) / 3 + LN(4 / 3) / 3, abs=1e-6), "CE must be averaged over the answer tokens"


def random_batch(seed, tokens=10, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(tokens, vocab, generator=g) * 3
    teacher = torch.randn(tokens, vocab, generator=g) * 3
    return student, teacher, torch.randint(0, vocab, (tokens,), generator=g)


def check_zero_weight_is_ce(fn):
    student, teacher, labels = random_batch(1)
    loss, _ = call(fn, student, teacher, labels, kl_weight=0.0, temperature=0.5)
    ce = F.cross_entropy(student, labels)
    assert loss == pytest.approx(float(ce), abs=1e-5), "with lambda = 0 the loss must be the plain cross-entropy"


def check_identical_models_have_zero_kl(fn):
    student, _, labels = random_batch(2)
    _, kl = call(fn, student, student.clone(), labels, kl_weight=1.0, temperature=0.5)
    assert abs(kl) < 1e-6, "a student equal to its teacher must have KL 0"


def written_out_reference(student, teacher, labels, kl_weight, temperature):
    """Eq. 1-2 written independently of sftguard (torch's kl_div), so sftguard's own function is checked too."""
    log_p_student = F.log_softmax(student / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")  # KL(teacher || student)
    return F.cross_entropy(student, labels) + kl_weight * temperature**2 * kl, kl


def check_matches_reference_and_gradient(fn):
    for seed, kl_weight, temperature in ((3, 1.0, 0.5), (4, 4.0, 2.0), (5, 0.25, 1.0)):
        student, teacher, labels = random_batch(seed)
        mine = student.clone().requires_grad_(True)
        ref = student.clone().requires_grad_(True)
        loss, kl = fn(mine, teacher, labels, kl_weight, temperature)
        ref_loss, ref_kl = written_out_reference(ref, teacher, labels, kl_weight, temperature)
        assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5), f"loss differs from the reference at lambda={kl_weight}, tau={temperature}"
        assert float(kl.detach()) == pytest.approx(float(ref_kl.detach()), rel=1e-5), f"kl differs from the reference at lambda={kl_weight}, tau={temperature}"
        loss.backward()
        ref_loss.backward()
        assert mine.grad is not None, "the loss must be differentiable with respect to the student's logits"
        assert torch.allclose(mine.grad, ref.grad, atol=1e-6), "the gradient on the student's logits differs from the reference"


CHECKS = [check_hand_values_tau1, check_hand_values_tau_half, check_forward_direction, check_token_mean,
          check_zero_weight_is_ce, check_identical_models_have_zero_kl, check_matches_reference_and_gradient]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_loss(loss_fn, check):
    check(loss_fn)


# Typical mistakes; each must fail at least one check, or the checks would let it pass.
def _parts(student, teacher, labels, temperature):
    s, t = student.float(), teacher.float()
    return F.cross_entropy(s, labels), F.log_softmax(t / temperature, -1), F.log_softmax(s / temperature, -1), None


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
    return F.cross_entropy(student / temperature, labels) + kl_weight * temperature**2 * kl, kl


def unsoftened_kl(student, teacher, labels, kl_weight, temperature):
    ce, log_p, log_q, _ = _parts(student, teacher, labels, 1.0)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    return ce + kl_weight * temperature**2 * kl, kl


def token_sum(student, teacher, labels, kl_weight, temperature):
    ce, log_p, log_q, _ = _parts(student, teacher, labels, temperature)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return ce + kl_weight * temperature**2 * kl, kl


def vocabulary_mean(student, teacher, labels, kl_weight, temperature):
    ce, log_p, log_q, _ = _parts(student, teacher, labels, temperature)
    kl = (log_p.exp() * (log_p - log_q)).mean()
    return ce + kl_weight * temperature**2 * kl, kl


@pytest.mark.parametrize("wrong", [reverse_kl, no_tau_squared, ce_at_tau, unsoftened_kl, token_sum, vocabulary_mean],
                         ids=lambda f: f.__name__)
def test_checks_catch_a_typical_mistake(wrong):
    failed = []
    for check in CHECKS:
        try:
            check(wrong)
        except AssertionError:
            failed.append(check.__name__)
    assert failed, f"no check caught {wrong.__name__}"

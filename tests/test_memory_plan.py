"""The memory plan printed at the start of stage 2: its parts follow the model, the batch and the flags, and a plan
that does not fit the device stops the run with one line naming the options."""
import copy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sftguard as S  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(smoke_base):
    teacher = S.freeze_as_teacher(copy.deepcopy(smoke_base.model))
    facts = [f for f in smoke_base.facts if f.get("key") != "uuid"][:40]
    return teacher, S.qa_batches(smoke_base.tokenizer, facts, 8), replace(smoke_base.cfg, batch_size=8)


def test_plan_parts_follow_model_batch_and_flags(setup):
    teacher, batches, cfg = setup
    n = S.count_params(teacher)
    sft = S.memory_plan(teacher, batches, [("sft", None)], cfg, CPU)
    assert (sft.weights, sft.gradients, sft.optimizer) == (4 * n, 4 * n, 8 * n)
    assert sft.teacher == sum(p.numel() * 4 for p in teacher.parameters())  # on a CPU the teacher stays in memory
    attn = S.memory_plan(teacher, batches, [("freeze", "attn")], cfg, CPU)
    trainable = sum(p.numel() for name, p in teacher.named_parameters() if ".self_attn." in name)
    assert (attn.weights, attn.gradients, attn.optimizer) == (4 * n, 4 * trainable, 8 * trainable)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    answers = max(int((batches.batch_of([i])["labels"][0, 1:] != -100).sum()) for i in range(batches.size)) * 8
    assert sft.logits == answers * vocab * (4 + 8)  # the answer tokens only, not every position
    bigger = S.memory_plan(teacher, batches, [("sft", None)], replace(cfg, batch_size=16), CPU)
    assert bigger.activations == 2 * sft.activations and bigger.logits == 2 * sft.logits
    checkpointed = S.memory_plan(teacher, batches, [("sft", None)], replace(cfg, gradient_checkpointing=True), CPU)
    assert checkpointed.activations < sft.activations  # 2 blocks here: one kept whole, one as its input
    bf16 = S.memory_plan(teacher, batches, [("sft", None)], replace(cfg, precision="bf16"), CPU)
    assert bf16.activations == sft.activations // 2
    distill = S.memory_plan(teacher, batches, [("sft", None), ("selfdistill", None)], cfg, CPU)
    assert distill.teacher > sft.teacher  # the hidden-state cache beside the teacher
    assert sft.total == sum(getattr(sft, k) for k in ("weights", "gradients", "optimizer", "teacher", "activations", "logits"))
    assert sft.line().startswith("memory plan: weights ")


def test_a_plan_that_does_not_fit_stops_with_the_options(setup, monkeypatch):
    teacher, batches, cfg = setup
    plan = S.memory_plan(teacher, batches, [("sft", None)], cfg, CPU)
    S.check_memory_plan(plan)  # fits on this machine
    teacher_bytes = sum(p.numel() * 4 for p in teacher.parameters())
    monkeypatch.setattr(S, "device_memory_bytes", lambda device: plan.total // 2 - teacher_bytes)
    small = S.memory_plan(teacher, batches, [("sft", None)], cfg, CPU)
    with pytest.raises(S.UserError, match="--batch_size.*--gradient_checkpointing.*8-bit optimizer.*several GPUs"):
        S.check_memory_plan(small)
    monkeypatch.setattr(S, "device_memory_bytes", lambda device: plan.total - teacher_bytes)  # within the 10% margin
    S.check_memory_plan(S.memory_plan(teacher, batches, [("sft", None)], cfg, CPU))


def test_the_run_stops_before_stage_2_when_the_plan_does_not_fit(smoke_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "device_memory_bytes", lambda device: 0)
    args = ["--preset", "smoke", "--method", "sft", "--device", "cpu", "--data", str(smoke_dirs["data"]),
            "--cache_dir", str(smoke_dirs["cache"]), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        S.cli(args)
    assert exit_info.value.code == 2
    assert "error: stage 2 needs about" in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()

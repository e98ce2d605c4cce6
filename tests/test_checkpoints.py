"""Checkpoints a 7B run can afford (issue 16): at most one student checkpoint on disk, per epoch only where it is
cheap (--epoch_checkpoints), and a disk that cannot hold one is refused with one line before anything is written."""
import json
import shutil
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sftguard as S  # noqa: E402

Usage = namedtuple("Usage", "total used free")


def tiny_model(width=16):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=4 * width, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def trained(model):
    """One AdamW step, so that the optimizer holds its moments as at the end of an epoch."""
    optimizer = torch.optim.AdamW(S.trainable_parameters(model), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    return optimizer


def save(folder, epoch, model, optimizer):
    S.save_epoch_checkpoint(folder, epoch, model, optimizer, torch.Generator().manual_seed(0),
                            {"step": epoch, "tokens": 0, "train_seconds": 0.0, "stopped": False, "extra": None})


def test_the_size_estimate_is_what_an_epoch_checkpoint_takes(tmp_path):
    model = tiny_model(width=128)  # 1.3 MB of weights
    S.set_trainable(model, "mlp")  # AdamW moments for the trainable weights only
    save(tmp_path, 1, model, trained(model))
    written = S.folder_bytes(tmp_path / "epoch-0001")  # beyond the estimate: file headers and the RNG states, ~30 kB
    assert S.epoch_checkpoint_bytes(model) <= written <= 1.01 * S.epoch_checkpoint_bytes(model) + 40_000


def test_an_epoch_checkpoint_replaces_the_last_one_which_goes_first(tmp_path, monkeypatch):
    model = tiny_model()
    optimizer = trained(model)
    on_disk_while_writing = []
    atomic = S.save_folder_atomic
    monkeypatch.setattr(S, "save_folder_atomic", lambda folder, write, **kw: (
        on_disk_while_writing.append(sorted(p.name for p in tmp_path.glob("epoch-*"))), atomic(folder, write, **kw)))
    for epoch in (1, 2, 3):
        save(tmp_path, epoch, model, optimizer)
    assert on_disk_while_writing == [[], [], []]  # never two student checkpoints at once
    assert [p.name for p in tmp_path.glob("epoch-*")] == ["epoch-0003"]


def test_a_disk_too_small_refuses_the_epoch_checkpoint_and_keeps_the_last(tmp_path, monkeypatch):
    model = tiny_model()
    optimizer = trained(model)
    save(tmp_path, 1, model, optimizer)
    last = S.folder_bytes(tmp_path / "epoch-0001")
    needed = S.epoch_checkpoint_bytes(model)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, needed - last - 1))  # the old one freed: 1 byte short
    with pytest.raises(S.UserError, match=r"the student's epoch checkpoint needs .* GB in .* but its disk has .* GB free; "
                                          r"free some space, choose another --out, or pass --epoch_checkpoints never"):
        save(tmp_path, 2, model, optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0001"]  # nothing lost, nothing half written
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, needed - last))  # just enough, once the old one goes
    save(tmp_path, 2, model, optimizer)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch-0002"]


@pytest.mark.parametrize("mode, max_mb, saves", [("always", 0, True), ("never", 10**6, False), ("auto", 1, True), ("auto", 0, False)])
def test_epoch_checkpoints_only_where_asked_or_cheap(mode, max_mb, saves):
    model = tiny_model()  # about 0.04 MB of weights: under 1 MB with its AdamW state, over 0
    cfg = S.Config(epoch_checkpoints=mode, epoch_checkpoint_max_mb=max_mb)
    assert 0 < S.epoch_checkpoint_bytes(model) < 2**20
    assert S.saves_epoch_checkpoints(model, cfg) is saves


def smoke(smoke_dirs, out, *extra):
    return ["--preset", "smoke", "--data", str(smoke_dirs["data"]), "--cache_dir", str(smoke_dirs["cache"]), "--out", str(out), *extra]


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    ((), "the teacher and an epoch checkpoint needs"),
    (("--epoch_checkpoints", "never"), "the teacher needs")])
def test_a_full_disk_stops_the_run_before_stage_1(smoke_dirs, smoke_base, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, 1000))
    trained_stage1 = []
    monkeypatch.setattr(S, "train", lambda *a, **k: trained_stage1.append(k["desc"]))
    with pytest.raises(SystemExit) as exit_info:
        S.cli(smoke(smoke_dirs, tmp_path / "out", "--method", "sft", *extra))
    assert exit_info.value.code == 2 and trained_stage1 == []
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0] and "GB free; free some space" in errors[0], errors
    assert not (tmp_path / "out").exists()  # no empty checkpoints/ that would ask for --resume


def test_resume_deletes_checkpoints_a_kill_left_half_written(tmp_path):
    checkpoints = tmp_path / "out" / "checkpoints"
    (checkpoints / "teacher").mkdir(parents=True)
    (checkpoints / "teacher" / "config.json").write_text(json.dumps({}))
    half = [checkpoints / "sft" / ".epoch-0002.tmp-abc", checkpoints / ".teacher.tmp-xyz"]
    for folder in half:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"0" * 100)
    (checkpoints / "sft" / "epoch-0001").mkdir()
    cfg = S.Config(out=str(tmp_path / "out"), method="sft", resume=True)
    S.check_output(cfg, S.output_folders(cfg), checkpoints)
    assert not any(folder.exists() for folder in half) and (checkpoints / "sft" / "epoch-0001").is_dir()


def test_a_finished_method_keeps_no_student_checkpoint_a_kill_left(tmp_path):
    (tmp_path / "epoch-0003").mkdir()  # killed between writing the result and deleting the last epoch checkpoint
    (tmp_path / "result.json").write_text(json.dumps({"method": "sft"}))
    assert S.run_method("sft", None, None, None, None, None, None, S.Config(), checkpoint_dir=tmp_path) == {"method": "sft"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]

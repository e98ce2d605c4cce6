"""torchrun (Part III, section 16) gives the study of one process: two CPU ranks (gloo, torch.multiprocessing) train
to the one-process weights and losses under DDP and FSDP2, FSDP2 leaves frozen weights and the teacher bit-identical,
the SliCK categories (greedy and sampled answers, shared out by batch) are the one-process ones, plain and sharded;
and a two-process `torchrun ... --method all` smoke run writes one results tree with the one-process metrics.

Tolerances: float32 throughout; weights and losses within atol 1e-5 of one process (the ranks' sums of a global
batch's gradient are added in another order than one process's)."""
import copy
import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sftguard as S  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, job, args, out):
    """One rank of a gloo group, as torchrun would start it (the same environment variables)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = JOBS[job](*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        S.stop_ranks()
    # Done: end without the interpreter's teardown, where torch's gloo threads can abort a process that has finished
    # its work (SIGABRT, "terminate called without an active exception"; pytorch#179291). A failing job still raises.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def on_two_ranks(job: str, *args, tmp_path: Path, world: int = WORLD):
    """JOBS[job](*args) on two (or `world`) ranks; rank 0's return value."""
    out = tmp_path / f"{job}.pt"
    ctx = mp.start_processes(_rank_main, args=(world, free_port(), job, args, out), nprocs=world, join=False, start_method="spawn")
    for _ in range(240):
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{job} on two ranks did not finish in 240 s")
    return torch.load(out, weights_only=False)


# --- Training: DDP after k steps equals one process; FSDP2 equals DDP --------------------------------------------
def tiny_llama(seed: int):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2,
                                                        num_key_value_heads=1, intermediate_size=32, vocab_size=40,
                                                        max_position_embeddings=32, tie_word_embeddings=True,
                                                        bos_token_id=0, eos_token_id=1, pad_token_id=2))


def uneven_batches(size=13, batch_size=6) -> S.QABatches:
    """QA examples of different prompt and answer lengths (so the ranks' slices hold different numbers of answer
    tokens), 13 of them in batches of 6: the last batch has one example, so rank 0 has none there (14 on three
    ranks: two examples, rank 0 has none)."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for i in range(size):
        prompt, answer = 3 + i % 4, 1 + (i * 7) % 5
        ids = torch.randint(3, 40, (prompt + answer,), generator=g).tolist()
        examples.append((ids, [-100] * prompt + ids[prompt:]))
    return S.QABatches(examples, batch_size, pad_token_id=2)


def train_job(method: str, fsdp: str, trainable: str = "all", size: int = 13):
    """Train the tiny model for one epoch (3 steps); (per-step losses of the global batch, final weights, the
    teacher's weights before and after, the student's before)."""
    cfg = S.Config(precision="fp32", device="cpu", fsdp=fsdp, lr=3e-3, warmup_frac=0.3, grad_clip=0.5, kl_weight=1.0,
                   temperature=0.5, teacher_cache="live" if trainable != "all" else "auto", batch_size=6)
    student, teacher = tiny_llama(0), S.freeze_as_teacher(tiny_llama(1))
    if fsdp == "on":
        S.shard_model(teacher)  # the frozen teacher sharded like the student
    teacher_before = {k: v.clone() for k, v in S.full_state_dict(teacher).items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    S.set_trainable(student, trainable)
    batches = uneven_batches(size)
    loss_fn = S.method_loss(method, student, teacher, cfg, batches)
    seen = []

    def recorded(logits, targets, batch):
        loss = loss_fn(logits, targets, batch)
        seen.append((loss.item(), 0 if "repeated" in batch else len(targets)))
        return loss
    S.train(student, batches, recorded, epochs=1, lr=cfg.lr, cfg=cfg, desc="t", seed=0)
    if S.world_size() > 1:  # each step's loss over the global batch: the ranks' means weighted by their tokens
        parts = [None] * S.world_size()
        torch.distributed.all_gather_object(parts, seen)
        seen = [(sum(l * n for l, n in step) / sum(n for _, n in step), sum(n for _, n in step)) for step in zip(*parts)]
    return {"losses": [l for l, _ in seen], "state": {k: v.clone() for k, v in S.full_state_dict(student).items()},
            "teacher_before": teacher_before, "teacher_after": S.full_state_dict(teacher), "student_before": student_before}


def assert_same_training(ref, other):
    assert len(other["losses"]) == len(ref["losses"]) == 3
    assert torch.allclose(torch.tensor(other["losses"]), torch.tensor(ref["losses"]), atol=ATOL, rtol=0)
    assert ref["state"].keys() == other["state"].keys()
    moved = 0
    for k, v in ref["state"].items():
        assert torch.allclose(other["state"][k], v, atol=ATOL, rtol=0), k
        moved += not torch.equal(v, ref["student_before"][k])
    assert moved > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "selfdistill"])
def test_ddp_equals_one_process_after_three_steps(method, tmp_path):
    ref = train_job(method, "off")
    assert_same_training(ref, on_two_ranks("train", method, "off", tmp_path=tmp_path))


@pytest.mark.slow
def test_ddp_on_three_ranks_weighs_a_repeated_example_zero(tmp_path):
    """A last batch of two examples on three ranks: rank 0 runs the first again, with weight 0."""
    ref = train_job("sft", "off", "all", 14)
    assert_same_training(ref, on_two_ranks("train", "sft", "off", "all", 14, tmp_path=tmp_path, world=3))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "selfdistill"])
def test_fsdp2_equals_ddp(method, tmp_path):
    ddp = on_two_ranks("train", method, "off", tmp_path=tmp_path)
    fsdp = on_two_ranks("train", method, "on", tmp_path=tmp_path)
    assert_same_training(ddp, fsdp)


@pytest.mark.slow
def test_fsdp2_keeps_frozen_weights_and_the_teacher_bit_identical(tmp_path):
    """--method freeze (attention trains) with a live, sharded teacher: the MLPs, norms and embeddings and every
    teacher weight stay bit-identical; each attention weight moves."""
    out = on_two_ranks("train", "selfdistill", "on", "attn", tmp_path=tmp_path)
    for k, v in out["teacher_before"].items():
        assert torch.equal(out["teacher_after"][k], v), k
    for k, v in out["state"].items():
        if "self_attn" in k:
            assert not torch.equal(v, out["student_before"][k]), k
        else:
            assert torch.equal(v, out["student_before"][k]), k
    ref = train_job("selfdistill", "off", "attn")  # and that is the one-process training
    assert_same_training(ref, out)


# --- SliCK: the distributed categories are the one-process ones ---------------------------------------------------
def slick_job(model_path: str, facts: list, cfg, sharded: bool):
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_path), AutoTokenizer.from_pretrained(model_path)
    if sharded:
        S.shard_model(model)
    S.seed_everything(0)
    return S.categorize_facts(model.eval(), tokenizer, facts, cfg, random.Random(0))


@pytest.mark.slow
@pytest.mark.parametrize("sharded", [False, True])
def test_distributed_slick_gives_the_same_categories(smoke_base, sharded, tmp_path):
    """Greedy and sampled answers in batches of 16 prompts (several per rank, an odd number of batches), plain
    (DDP's replicas) and sharded (FSDP2: synced generation, the shorter share repeating a batch)."""
    facts = S.category_pool(smoke_base.facts, smoke_base.cfg)[:60]
    cfg = replace(smoke_base.cfg, eval_batch_size=16)
    ref = slick_job(str(smoke_base.path), facts, cfg, False)
    assert len(set(ref.values())) >= 3  # sampling decides some (WeaklyKnown vs Unknown)
    assert on_two_ranks("slick", str(smoke_base.path), facts, cfg, sharded, tmp_path=tmp_path) == ref


# --- --resume under FSDP2: torch.distributed.checkpoint, each rank its shards -------------------------------------
def resume_job(folder: str):
    """Two epochs straight; two epochs killed after the first epoch's checkpoint; then resumed from it, into a model
    with other weights. And the stage-1 teacher checkpoint of a sharded teacher, loaded into a plain model."""
    cfg = S.Config(precision="fp32", device="cpu", fsdp="on", lr=3e-3, warmup_frac=0.3, batch_size=6)
    checkpoints, batches = Path(folder) / "method", uneven_batches()
    straight = tiny_llama(0)
    S.train(straight, batches, S.next_token_loss, epochs=2, lr=cfg.lr, cfg=cfg, desc="straight", seed=0)

    def killed_in_epoch_2(epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's
    killed = tiny_llama(0)
    with pytest.raises(KeyboardInterrupt):
        S.train(killed, batches, S.next_token_loss, epochs=2, lr=cfg.lr, cfg=cfg, desc="killed", seed=0,
                checkpoint_dir=checkpoints, on_epoch_end=killed_in_epoch_2)
    files = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob("*") if p.is_file())
    resumed = tiny_llama(7)
    S.train(resumed, batches, S.next_token_loss, epochs=2, lr=cfg.lr, cfg=cfg, desc="resumed", seed=0, checkpoint_dir=checkpoints)
    S.save_teacher_checkpoint(Path(folder), S.freeze_as_teacher(straight), {"best_epoch": 2}, cfg)
    plain = tiny_llama(3)
    stage1 = S.resumed_teacher(Path(folder), plain)
    return {"straight": S.full_state_dict(straight), "resumed": S.full_state_dict(resumed), "files": files,
            "teacher": plain.state_dict(), "stage1": stage1}


@pytest.mark.slow
def test_fsdp2_resumes_from_its_distributed_checkpoint(tmp_path):
    out = on_two_ranks("resume", str(tmp_path / "run"), tmp_path=tmp_path)
    assert any(f.startswith("epoch-0001/state.dcp/") for f in out["files"])  # DCP: the shards, no safetensors
    assert not any(f.endswith(".safetensors") for f in out["files"]) and "epoch-0001/rng.pt" in out["files"]
    for k, v in out["straight"].items():
        assert torch.allclose(out["resumed"][k], v, atol=1e-6, rtol=0), k
        assert torch.equal(out["teacher"][k], v), k
    assert out["stage1"] == {"best_epoch": 2}


def replace_checkpoint_job(folder: str):
    """Three epochs of DDP with a checkpoint after each, rank 1's disk check slowed by a second: the epoch checkpoints
    each rank finds while it checks the disk (gathered on rank 0)."""
    import time

    cfg = S.Config(precision="fp32", device="cpu", fsdp="off", lr=3e-3, warmup_frac=0.3, batch_size=6)
    checkpoints, seen, check = Path(folder) / "method", [], S.check_free_space

    def slow_check(folder, *args, **kwargs):  # a slow disk on rank 1
        if S.rank() == 1:
            time.sleep(1.0)
        seen.append(sorted(p.name for p in checkpoints.glob("epoch-*")))
        return check(folder, *args, **kwargs)
    S.check_free_space = slow_check
    try:
        S.train(tiny_llama(0), uneven_batches(), S.next_token_loss, epochs=3, lr=cfg.lr, cfg=cfg, desc="t", seed=0,
                checkpoint_dir=checkpoints)
    finally:
        S.check_free_space = check
    parts = [None] * S.world_size()
    torch.distributed.all_gather_object(parts, seen)
    return {"seen": parts, "left": sorted(p.name for p in checkpoints.glob("epoch-*"))}


@pytest.mark.slow
def test_every_rank_checks_the_disk_before_rank_0_deletes_the_last_checkpoint(tmp_path):
    """The CI failure of a two-process study: rank 0 deleted epoch 1's checkpoint while rank 1 was still measuring
    it for the disk check, and rank 1 died on a file gone from under it."""
    out = on_two_ranks("replace_checkpoint", str(tmp_path / "run"), tmp_path=tmp_path)
    assert out["seen"] == [[[], ["epoch-0001"], ["epoch-0002"]]] * 2
    assert out["left"] == ["epoch-0003"]


JOBS = {"train": train_job, "slick": slick_job, "resume": resume_job, "replace_checkpoint": replace_checkpoint_job}


# --- The whole study under torchrun -----------------------------------------------------------------------------
def results_tree(root: Path) -> dict:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.slow
def test_two_process_smoke_study_equals_one_process(smoke_dirs, tmp_path):
    """`torchrun --nproc_per_node 2 sftguard.py --preset smoke --method all`: one results tree, the files of the
    one-process run, the same metrics (exact match: equal), world_size 2 and engine ddp recorded."""
    common = ["--preset", "smoke", "--method", "all", "--data", smoke_dirs["data"], "--cache_dir", smoke_dirs["cache"],
              "--device", "cpu"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "sftguard.py", *map(str, common), "--out", tmp_path / "one"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "sftguard.py",
                          *map(str, common), "--out", tmp_path / "two"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, "\n".join(line for line in two.stderr.splitlines() if line.startswith("rank "))
    assert results_tree(tmp_path / "two") == results_tree(tmp_path / "one")
    assert two.stdout.count("| method | trainable |") == 1  # one rank printed the table
    for name, _ in [(S.run_name(m, t), 0) for m, t in S.ALL_RUNS]:
        a = json.loads((tmp_path / "one" / name / "results.json").read_text())
        b = json.loads((tmp_path / "two" / name / "results.json").read_text())
        assert b["curve"] == a["curve"] and b["final"] == a["final"] and b["forgetting"] == a["forgetting"], name
        assert (a["world_size"], a["engine"], b["world_size"], b["engine"]) == (1, "none", 2, "ddp")
        config = json.loads((tmp_path / "two" / name / "config.json").read_text())
        assert (config["world_size"], config["engine"]) == (2, "ddp")


@pytest.mark.slow
def test_a_failing_rank_ends_the_run_with_one_line_each(smoke_dirs, tmp_path):
    bad = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "sftguard.py",
                          "--preset", "smoke", "--method", "sft", "--data", smoke_dirs["data"], "--cache_dir",
                          smoke_dirs["cache"], "--device", "cpu", "--experiment", "capacity", "--out", tmp_path / "x"],
                         cwd=REPO, env={**os.environ, "TQDM_DISABLE": "1"}, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    # The first rank to fail prints its line before it exits; torchrun may end the other before it prints its own.
    lines = [line for line in bad.stderr.splitlines() if line.startswith("rank ")]
    ranks = [line.split(":")[0] for line in lines]
    assert lines and set(ranks) <= {"rank 0", "rank 1"} and len(set(ranks)) == len(ranks), bad.stderr[-2000:]
    assert all(": error: under torchrun" in line and "one process" in line for line in lines)
    assert 'sftguard.py", line' not in bad.stderr  # one line, not a traceback of ours
    assert not (tmp_path / "x").exists()

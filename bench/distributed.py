"""bench/distributed.py: one process against two (torchrun's path, gloo on this CPU), for sft and selfdistill: training
tokens/s per process, peak memory per process, and each rank's model state (weights + gradients + AdamW moments) under
DDP and FSDP2 against one process's.

    python bench/distributed.py                        # the rows in bench/README.md ("More than one process")
    python bench/distributed.py --size m --steps 12    # the large preset's 8x256 model

Every configuration runs in fresh processes (torch.multiprocessing spawn; two ranks for DDP and FSDP2), through
sftguard's own train() and method_loss on a randomly initialised Llama of sftguard's architecture and QA-shaped
examples (random tokens: speed and memory do not depend on them). Timing: the second of two epochs of --steps
optimizer steps (the first warms up). Tokens/s per process: the tokens of that process's slices / the epoch's time,
so two processes on two cores that keep pace give about the one-process figure each. Peak memory: peak RSS (VmHWM)
of the process and, above it, what the configuration added to the RSS it started from. Model state: the bytes of
the tensors each rank holds for the student (its shards under FSDP2: DTensor.to_local), its gradients as
optimizer.step() sees them, and AdamW's two moments, measured on the tensors (not computed from counts); the
teacher's (frozen, no gradient or moments) are given apart. Writes DIR/distributed.json and DIR/distributed.md.
"""
import argparse
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"s": dict(n_layer=4, n_embd=128, n_head=4), "m": dict(n_layer=8, n_embd=256, n_head=8)}


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def local_bytes(t) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def examples(n: int, vocab: int, seed: int = 0):
    """QA-shaped examples: a 10-16 token prompt and a 2-6 token answer (the synthetic world's facts' lengths)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt, answer = int(torch.randint(10, 17, (), generator=g)), int(torch.randint(2, 7, (), generator=g))
        ids = torch.randint(3, vocab, (prompt + answer,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def worker(rank: int, world: int, port: int, spec: dict, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    import torch

    torch.set_num_threads(spec["threads"])
    if world > 1:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import sftguard as S
    from transformers import AutoModelForCausalLM

    start_rss = proc_status_bytes("VmRSS")
    cfg = S.Config(precision="fp32", device="cpu", fsdp=spec["engine"] if world > 1 else "off", batch_size=spec["batch"],
                   **SIZES[spec["size"]])
    tokenizer_free = S.make_model_config(cfg, type("T", (), {"__len__": lambda self: cfg.vocab_size, "eos_token_id": 1,
                                                             "pad_token_id": 2})())
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tokenizer_free)
    torch.manual_seed(1)
    teacher = S.freeze_as_teacher(AutoModelForCausalLM.from_config(tokenizer_free))
    if spec["engine"] == "on" and world > 1:
        S.shard_model(teacher)
    batches = S.QABatches(examples(spec["steps"] * spec["batch"], cfg.vocab_size), spec["batch"], pad_token_id=2)
    loss_fn = S.method_loss(spec["method"], student, teacher, cfg, batches)
    state = {}
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kwargs):  # the optimizer train() makes, with a look at what each step holds
        opt = real_adamw(params, **kwargs)

        def before_step(optimizer, args, kwargs):
            state["weights"] = sum(local_bytes(p) for p in student.parameters())
            state["gradients"] = sum(local_bytes(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None)

        def after_step(optimizer, args, kwargs):
            state["optimizer"] = sum(local_bytes(t) for s in optimizer.state.values() for t in s.values()
                                     if isinstance(t, torch.Tensor) and t.dim() > 0)
        opt.register_step_pre_hook(before_step)
        opt.register_step_post_hook(after_step)
        return opt
    torch.optim.AdamW = recording_adamw
    marks = []
    stats = S.train(student, batches, loss_fn, epochs=2, lr=1e-4, cfg=cfg, desc="bench",
                    on_epoch_end=lambda epoch: marks.append((time.perf_counter(), epoch)))
    torch.optim.AdamW = real_adamw
    seconds = marks[1][0] - marks[0][0]
    row = {**spec, "world_size": world, "rank": rank, "tokens_per_s_per_process": stats["tokens"] / 2 / seconds,
           "peak_rss_bytes": proc_status_bytes("VmHWM"), "start_rss_bytes": start_rss,
           "model_state_bytes": state["weights"] + state["gradients"] + state["optimizer"], **state,
           "teacher_bytes": sum(local_bytes(p) for p in teacher.parameters()),
           "params": sum(p.numel() for p in student.parameters())}
    rows = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(rows, row)
        torch.distributed.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(spec: dict, world: int, tmp: Path) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp / f"{spec['method']}-{spec['engine']}-{world}.json"
    mp.start_processes(worker, args=(world, free_port(), spec, str(out)), nprocs=world, start_method="spawn")
    return json.loads(out.read_text())


def mb(x: float) -> str:
    return f"{x / 2**20:.1f}"


def markdown(result: dict) -> str:
    lines = [f"# One process against two (gloo, {result['machine']})", "",
             f"Model `{result['size']}` ({result['params'] / 1e6:.2f}M parameters), batch {result['batch']} QA pairs "
             f"(global), {result['steps']} steps an epoch, fp32, {result['threads']} thread(s) per process.", "",
             "| method | processes | engine | tokens/s per process | peak RSS per process (MB) | above start (MB) | "
             "model state per rank (MB) | vs one process | teacher per rank (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['world_size']} | {r['engine_name']} | {r['tokens_per_s_per_process']:.0f} | "
                     f"{mb(r['peak_rss_bytes'])} | {mb(r['peak_rss_bytes'] - r['start_rss_bytes'])} | "
                     f"{mb(r['model_state_bytes'])} | {r['state_ratio']:.2f}x | {mb(r['teacher_bytes'])} |")
    lines += ["", "Model state: weights + gradients + AdamW's two moments held by one rank (rank 0; the ranks differ "
              "by at most one row of a weight), measured on the tensors; teacher: its weights on that rank."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    p.add_argument("--size", default="s", choices=list(SIZES))
    p.add_argument("--batch", type=int, default=32, help="global batch (QA pairs per step), the default preset's")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per epoch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    import tempfile

    os.environ["TQDM_DISABLE"] = "1"  # the children inherit it before they import tqdm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("sft", "selfdistill"):
            spec = dict(method=method, size=args.size, batch=args.batch, steps=args.steps, threads=args.threads)
            one = run({**spec, "engine": "off"}, 1, Path(tmp))[0]
            one["engine_name"] = "none"
            ddp = run({**spec, "engine": "off"}, 2, Path(tmp))[0]
            ddp["engine_name"] = "ddp"
            fsdp = run({**spec, "engine": "on"}, 2, Path(tmp))[0]
            fsdp["engine_name"] = "fsdp"
            for r in (one, ddp, fsdp):  # ratios within this run
                r["state_ratio"] = r["model_state_bytes"] / one["model_state_bytes"]
                rows.append(r)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "size": args.size,
              "batch": args.batch, "steps": args.steps, "threads": args.threads, "params": rows[0]["params"], "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "distributed.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""bench/run.py: what each sftguard method costs: training tokens/s, step time and peak memory, side by side
with TRL's GKDTrainer, plus the generation throughput of SliCK categorisation and evaluation.

    python bench/run.py --quick                  # one model size and batch shape, under a minute on 2 idle cores
    python bench/run.py --out bench/results      # two model sizes x two batch shapes (CPU); more sizes on a GPU
    python bench/run.py --compile                # CUDA: torch.compile the models as well

It times sftguard's own code (qa_batches, method_loss, build_teacher_cache, train, generate_answers), not a
copy. Every configuration runs in a fresh process (forked from a server that has imported torch and
transformers once), so its peak memory is its own: CUDA max_memory_allocated on a GPU, peak RSS on a CPU
(also given above the process's RSS before the model was built, since the interpreter and libraries weigh
hundreds of MB). Timing: one warm-up repeat, then --repeats repeats of --steps optimizer steps, in each of
--rounds processes; the median repeat is reported. Memory: one more process per configuration, a warm-up
repeat, then the repeat whose peak is reported (on a CPU with RSS made to follow live tensors). On CUDA the methods run under bf16 autocast and MFU is reported.

The models are randomly initialised Llamas of sftguard's synthetic-world architecture (speed does not depend
on the weights); the data are the synthetic world's QA facts, as many as the default preset trains on in stage
2, tokenised by a tokenizer trained on the world. Writes DIR/bench.json and DIR/bench.md.
"""

import argparse
import copy
import itertools
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Model sizes: sftguard's default and large presets; "s-v32k" is "s" with a 32k vocabulary like an LLM's (rows the
# world's tokenizer never uses, but the logits, the softmaxes and a cache are that wide); two GPU-sized ones (the
# last has >= 300M parameters).
SIZES = {
    "s": dict(n_layer=4, n_embd=128, n_head=4),
    "m": dict(n_layer=8, n_embd=256, n_head=8),
    "s-v32k": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=32000),
    "s-v150k": dict(n_layer=4, n_embd=128, n_head=4, vocab_size=150000),  # Qwen2.5's 151k vocabulary
    "l": dict(n_layer=12, n_embd=768, n_head=12),
    "xl": dict(n_layer=24, n_embd=1024, n_head=16),
}
# method -> (sftguard method, extra sftguard flags); trl-gkd is the peer.
METHODS = {
    "sft": ("sft", []),
    "selfdistill-plain": ("selfdistill", ["--teacher_cache", "live", "--kl_chunk", "0"]),  # Eq. 1-2 as written
    "selfdistill-live": ("selfdistill", ["--teacher_cache", "live"]),  # a teacher forward every step, chunked KL
    "selfdistill-cached": ("selfdistill", ["--teacher_cache", "hidden"]),  # sftguard's default (auto picks it): last hidden states
    "selfdistill-fp32": ("selfdistill", ["--teacher_cache", "fp32"]),  # full-vocabulary log-probabilities
    "selfdistill-bf16": ("selfdistill", ["--teacher_cache", "bf16"]),
    "selfdistill-topk": ("selfdistill", ["--teacher_cache", "topk"]),
    "freeze-attn": ("freeze", ["--trainable", "attn"]),
    "l2": ("l2", []),
    "trl-gkd": (None, []),  # without gradient checkpointing, like sftguard: the same work
    "trl-gkd-default": (None, []),  # TRL's default, gradient checkpointing on: less memory, more compute
}
QUICK_SKIPS = ("selfdistill-plain", "selfdistill-fp32", "selfdistill-bf16", "selfdistill-topk", "trl-gkd-default")
TODAY = "bd34de9"  # the code before issue 16 (full [batch, positions, vocabulary] logits), measured beside the new one
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak


# ----------------------------------------------------------------------------------------------------------------
# Setup shared by every configuration: the world's facts and a tokenizer trained on its corpus (cached)
# ----------------------------------------------------------------------------------------------------------------
def prepare(cache: Path, n_facts: int) -> dict:
    import data_prep
    import sftguard

    data = cache / "world-default"
    if not data_prep.is_complete(data):
        data_prep.build_world(data_prep.WorldConfig(**{**data_prep.WORLD_PRESETS["default"], "preset": "default",
                                                       "out": str(data), "overwrite": True}))
    tok_dir = cache / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        texts = [json.loads(line)["text"] for line in (data / "pretrain.jsonl").read_text().splitlines() if line.strip()]
        sftguard.train_tokenizer(texts, sftguard.Config.vocab_size).save_pretrained(tok_dir)
    facts, _ = sftguard.load_facts(data)
    facts = [f for f in facts if f.get("key") != "uuid"][:n_facts]
    return {"data": str(data), "tokenizer": str(tok_dir), "facts": facts}


def program(spec: dict):
    """The sftguard module a row measures: this checkout's, or today's (TODAY, extracted by main into a temporary
    folder) loaded under its own name in this row's process."""
    if spec.get("code", "new") == "new":
        import sftguard
        return sftguard
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("sftguard_today", spec["today_path"])
    module = importlib.util.module_from_spec(module_spec)
    sys.modules["sftguard_today"] = module
    module_spec.loader.exec_module(module)
    return module


def extract_today(folder: Path) -> str:
    import subprocess

    path = folder / "sftguard.py"
    path.write_text(subprocess.run(["git", "show", f"{TODAY}:sftguard.py"], cwd=REPO, check=True, capture_output=True, text=True).stdout)
    return str(path)


def build(spec: dict):
    """sftguard's config, the tokenizer, a frozen teacher of the given size and its trainable copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sftguard = program(spec)
    torch.set_num_threads(spec["threads"])
    method, flags = METHODS[spec["method"]] if spec["method"] in METHODS else ("sft", [])
    size = SIZES[spec["size"]]
    precision = ["--precision", spec.get("precision", "auto")] if spec.get("code", "new") == "new" else []  # TODAY had none
    cfg = sftguard.parse_config(["--preset", "default", "--method", method or "selfdistill", "--device", spec["device"],
                                 "--batch_size", str(spec["batch_size"]), "--n_layer", str(size["n_layer"]),
                                 "--n_embd", str(size["n_embd"]), "--n_head", str(size["n_head"]), *precision, *flags])
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    torch.manual_seed(0)
    model_config = sftguard.make_model_config(cfg, tokenizer)
    model_config.vocab_size = size.get("vocab_size", model_config.vocab_size)
    teacher = AutoModelForCausalLM.from_config(model_config).to(spec["device"])
    teacher = sftguard.freeze_as_teacher(teacher)
    student = copy.deepcopy(teacher)
    sftguard.set_trainable(student, cfg.trainable if method == "freeze" else "all")
    return cfg, tokenizer, teacher, student


# ----------------------------------------------------------------------------------------------------------------
# Peak memory of this process
# ----------------------------------------------------------------------------------------------------------------
def reset_peak_memory(device: str) -> int:
    """Start counting the peak from now; returns the baseline that peak_memory_above subtracts."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
        f.write("5")
    return proc_status_bytes("RssAnon")


MMAP_THRESHOLD = 64 * 1024  # --cpu_mmap_threshold's default


def track_live_tensors(threshold: int):
    """CPU: make peak RSS follow the tensors alive, as CUDA's max_memory_allocated does. By default glibc serves
    blocks below a moving threshold (up to 32 MB) from its heap and keeps them when freed, so RSS also counts
    freed tensors, by amounts that depend on the order of allocations rather than on the method; a fixed mmap
    threshold gives every block of `threshold` bytes or more its own mapping, returned to the OS when freed.
    It must be set before the first large allocation: heap left fragmented earlier (e.g. by a teacher cache's
    construction) stays resident. 0 keeps glibc's default."""
    import ctypes

    if threshold:
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD (also stops its adjustment)
        except (OSError, AttributeError):  # not glibc: RSS as it comes
            pass


def peak_memory(device: str) -> int:
    """CUDA: max_memory_allocated; CPU: peak RSS (VmHWM) since reset_peak_memory."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return proc_status_bytes("VmHWM")


def peak_memory_above(device: str, baseline: int) -> int:
    """The peak less what was there before the configuration began. CPU: peak RSS less the pages of files
    (library code, first touched while running) and the anonymous memory at the start, i.e. an estimate of the
    peak of what this configuration allocated (exact if no file page was dropped after the peak)."""
    if device.startswith("cuda"):
        return peak_memory(device) - baseline
    return peak_memory(device) - proc_status_bytes("RssFile") - proc_status_bytes("RssShmem") - baseline


def start_measured_repeat(device: str) -> int:
    """Memory process, after its warm-up repeat: hand back what was freed and count the peak from here; returns what
    the process holds then (weights, optimizer state, a teacher or its cache: no gradients, no activations)."""
    release_freed_memory()
    return reset_peak_memory(device)


def release_freed_memory():
    """Hand the heap that setup freed (e.g. a teacher once its cache is built) back to the OS before the timed
    part, in every configuration alike, so that peak RSS counts what training holds (glibc's malloc_trim)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# ----------------------------------------------------------------------------------------------------------------
# Workers: each runs in its own process and returns one row
# ----------------------------------------------------------------------------------------------------------------
def train_worker(spec: dict) -> dict:
    """Time sftguard.train with the method's loss: one warm-up repeat, then spec["repeats"] timed repeats; or, with
    spec["phase"] == "memory", one warm-up repeat and one repeat whose peak memory is measured."""
    import contextlib

    import torch

    sftguard = program(spec)
    memory_phase = begin_worker(spec)
    base_mem = reset_peak_memory(spec["device"])
    cfg, tokenizer, teacher, student = build(spec)
    batches = sftguard.qa_batches(tokenizer, spec["facts"], spec["batch_size"])
    method = METHODS[spec["method"]][0]
    # The new code sets up its precision itself (cfg.precision: sftguard.Precision in train and method_loss); TODAY
    # had no such set-up, and its bf16 rows run it under the autocast its bench used (fp32 weights).
    today_bf16 = spec.get("code", "new") != "new" and spec["precision"] == "bf16"
    autocast = torch.autocast(spec["device"].split(":")[0], dtype=torch.bfloat16) if today_bf16 else contextlib.nullcontext()
    started = time.perf_counter()
    with autocast:
        loss_fn = sftguard.method_loss(method, student, teacher, cfg, batches)  # a cached teacher is built here
    cache_s = time.perf_counter() - started if method == "selfdistill" and cfg.teacher_cache != "live" else None
    cache_bytes = None
    if cache_s is not None:
        cache = next(c.cell_contents for c in loss_fn.__closure__ if isinstance(c.cell_contents, dict) and "rows" in c.cell_contents)
        cache_bytes = sftguard.teacher_cache_bytes(cache)
    live_teacher = method == "selfdistill" and cfg.teacher_cache == "live"
    if not live_teacher:
        del teacher  # only a live teacher is needed while training (l2 keeps its own anchor copy)
    if spec["compile"]:
        student = torch.compile(student)
    release_freed_memory()
    steps, tokens, ends = spec["steps"], [], []

    def repeat_batches(generator):  # `steps` batches, running into the next epoch when one ends
        tokens.append(0)
        for batch in itertools.islice(itertools.chain.from_iterable(batches(generator) for _ in itertools.count()), steps):
            tokens[-1] += int(batch["attention_mask"].sum())
            yield batch
    repeat_batches.steps = steps

    repeats = 1 if memory_phase else spec["repeats"]

    state_mem = []

    def epoch_end(epoch):  # epoch 1 is the warm-up, then the timed repeats or the one measured for memory
        ends.append(time.perf_counter())
        if memory_phase and epoch == 1:
            state_mem.append(start_measured_repeat(spec["device"]))  # weights, optimizer state, teacher or cache

    ends.append(time.perf_counter())
    with autocast:
        sftguard.train(student, repeat_batches, loss_fn, epochs=1 + repeats, lr=1e-4, cfg=cfg,
                       desc=spec["method"], on_epoch_end=epoch_end)
    seconds = [ends[epoch] - ends[epoch - 1] for epoch in range(2, 2 + repeats)]
    row = measured_row(spec, seconds, tokens[1:1 + repeats], student, base_mem, extra_forward=live_teacher)
    row.update(cache_s=cache_s, cache_bytes=cache_bytes, teacher_cache=cfg.teacher_cache if method == "selfdistill" else None)
    if state_mem:  # what a step allocates beyond the weights, gradients and optimizer state (and teacher or cache)
        grad_bytes = sum(p.numel() * 4 for p in sftguard.trainable_parameters(student))
        row["step_alloc_bytes"] = peak_memory_above(spec["device"], state_mem[0]) - grad_bytes
    return row


def begin_worker(spec: dict) -> bool:
    """Whether this process measures memory (else time); a CPU memory process makes RSS follow live tensors from
    its first allocation on (track_live_tensors), a timing process keeps the allocator as a user's run has it."""
    memory_phase = spec.get("phase") == "memory"
    if memory_phase and not spec["device"].startswith("cuda"):
        track_live_tensors(spec["mmap_threshold"])
    return memory_phase


def trl_worker(spec: dict) -> dict:
    """The peer: TRL's GKDTrainer, off-policy (lmbda=0) forward KL (beta=0), on the same models, batches and
    optimizer settings; step times from its callbacks, tokens from the batches its loss sees."""
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        return {"method": spec["method"], "error": f"TRL is not installed ({e}); pip install -r bench/requirements-bench.txt"}
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback

    import sftguard

    memory_phase = begin_worker(spec)
    base_mem = reset_peak_memory(spec["device"])
    cfg, tokenizer, teacher, student = build(spec)
    batches = sftguard.qa_batches(tokenizer, spec["facts"], spec["batch_size"])
    steps, repeats = spec["steps"], 1 if memory_phase else spec["repeats"]
    ends, tokens = [], []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())
            if memory_phase and state.global_step == steps:  # as in train_worker: after the warm-up repeat
                start_measured_repeat(spec["device"])

    def collate(rows):  # sftguard's own right-padded batches of the same examples
        batch = batches.batch_of([r["index"] for r in rows])
        batch.pop("index")
        return batch

    cuda = spec["device"].startswith("cuda")
    with tempfile.TemporaryDirectory() as out:
        args = GKDConfig(output_dir=out, lmbda=0.0, beta=0.0, temperature=cfg.temperature, max_steps=(1 + repeats) * steps,
                         per_device_train_batch_size=spec["batch_size"], learning_rate=1e-4, weight_decay=0.0,
                         adam_beta2=0.95, max_grad_norm=cfg.grad_clip, lr_scheduler_type="cosine", warmup_steps=1,
                         save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True, use_cpu=not cuda,
                         bf16=cuda, torch_compile=spec["compile"], dataloader_num_workers=0, seed=0,
                         gradient_checkpointing=spec["method"] == "trl-gkd-default")
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_dict({"index": list(range(batches.size))}),
                             data_collator=collate, callbacks=[StepClock()])
        compute_loss = trainer.compute_loss

        def counted_loss(model, inputs, *a, **k):
            tokens.append(int(inputs["attention_mask"].sum()))
            return compute_loss(model, inputs, *a, **k)
        trainer.compute_loss = counted_loss
        release_freed_memory()
        trainer.train()
    # repeat r spans the steps r*steps+1 .. (r+1)*steps; repeat 0 is the warm-up
    seconds = [ends[(r + 1) * steps - 1] - ends[r * steps - 1] for r in range(1, 1 + repeats)]
    tokens = [sum(tokens[r * steps:(r + 1) * steps]) for r in range(1, 1 + repeats)]
    return measured_row(spec, seconds, tokens, trainer.model, base_mem, extra_forward=True)


def generation_worker(spec: dict) -> dict:
    """Questions per second of sftguard's evaluation (greedy, zero-shot) and SliCK categorisation (few-shot
    prompts, greedy plus samples where greedy never succeeds), through generate_answers."""
    import random

    import sftguard

    base_mem = reset_peak_memory(spec["device"])
    cfg, tokenizer, teacher, student = build(spec)
    del student
    facts = spec["facts"][:spec["questions"]]
    sftguard.accuracy(teacher, tokenizer, facts[:8], cfg)  # warm-up
    eval_s, slick_s = [], []
    for _ in range(spec["repeats"]):
        started = time.perf_counter()
        sftguard.accuracy(teacher, tokenizer, facts, cfg)
        eval_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        sftguard.categorize_facts(teacher, tokenizer, facts[:spec["slick_facts"]], cfg, random.Random(0))
        slick_s.append(time.perf_counter() - started)
    return {"method": "generation", "model": spec["size"], "model_params": sftguard.count_params(teacher),
            "device": spec["device"], "eval_questions": len(facts), "eval_questions_per_s": len(facts) / statistics.median(eval_s),
            "slick_facts": spec["slick_facts"], "slick_prompts_per_fact": cfg.slick_prompts, "slick_samples": cfg.slick_samples,
            "slick_facts_per_s": spec["slick_facts"] / statistics.median(slick_s),
            "peak_mem_bytes": peak_memory(spec["device"]), "peak_mem_delta_bytes": peak_memory_above(spec["device"], base_mem)}


def measured_row(spec: dict, seconds: list[float], tokens: list[int], model, base_mem: int, extra_forward: bool) -> dict:
    sftguard = program(spec)

    return {"method": spec["method"], "code": spec.get("code", "new"), "precision": spec.get("precision", "auto"), "model": spec["size"], "model_params": sftguard.count_params(model),
            "batch_size": spec["batch_size"], "device": spec["device"], "threads": spec["threads"],
            "peak_mem_bytes": peak_memory(spec["device"]), "peak_mem_delta_bytes": peak_memory_above(spec["device"], base_mem),
            "steps_per_repeat": spec["steps"], "repeat_s": seconds, "repeat_tokens": tokens,
            "flops_per_token_per_param": 6 + 2 * extra_forward}  # model FLOPs: 6N a trained token, 2N more for a live teacher


def merge_rounds(runs: list[dict], memory: dict, peak_flops: float) -> dict:
    """One row from the timing rounds of a configuration (the median repeat over all rounds) and its memory
    process (the peak memory; the timing processes' own peak, allocator as it comes, is kept apart)."""
    if any("error" in r for r in [*runs, memory]):
        return next(r for r in [*runs, memory] if "error" in r)
    row = {**runs[0], "repeat_s": [s for r in runs for s in r["repeat_s"]], "repeat_tokens": [t for r in runs for t in r["repeat_tokens"]],
           "peak_mem_bytes": memory["peak_mem_bytes"], "peak_mem_delta_bytes": memory["peak_mem_delta_bytes"],
           "step_alloc_bytes": memory.get("step_alloc_bytes"),
           "peak_mem_timing_bytes": max(r["peak_mem_bytes"] for r in runs)}  # with the build and a cache's construction
    steps, seconds, tokens = row["steps_per_repeat"], row["repeat_s"], row["repeat_tokens"]
    row.update(rounds=len(runs), repeats=len(seconds), batch=f"{row['batch_size']}x{round(statistics.mean(tokens) / steps / row['batch_size'])}",
               tokens_per_s=statistics.median(t / s for t, s in zip(tokens, seconds)), step_ms=1000 * statistics.median(seconds) / steps)
    if peak_flops:
        row["mfu"] = row["flops_per_token_per_param"] * row["model_params"] * row["tokens_per_s"] / peak_flops
    return row


def run_isolated(worker, spec: dict) -> dict:
    """Run one worker in a fresh process forked from the server; a failure becomes the row's error."""
    receive, send = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=child, args=(worker, spec, send))
    process.start()
    send.close()
    try:
        row = receive.recv()
    except EOFError:  # killed, e.g. out of memory
        row = {"error": "the process died"}
    process.join()
    if "error" in row:
        row.update(method=spec["method"], code=spec.get("code", "new"), precision=spec.get("precision"), model=spec["size"],
                   batch_size=spec.get("batch_size"), exit_code=process.exitcode)
    return row


def child(worker, spec: dict, send):
    try:
        send.send(worker(spec))
    except Exception as e:  # noqa: BLE001 - a failed configuration is reported, not fatal
        send.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------
def mb(x) -> str:
    return "–" if x is None else f"{x / 2**20:.1f}"


def ratios(rows: list[dict]) -> list[dict]:
    """The issue's targets, per model size and batch shape."""
    out = []
    for key in sorted({(r["model"], r["batch_size"]) for r in rows if "error" not in r}):
        by = {r["method"]: r for r in rows if (r.get("model"), r.get("batch_size")) == key and "error" not in r
              and r.get("code", "new") == "new" and r.get("precision") == rows[0].get("precision")}

        def ratio(a, b, field):
            return by[a][field] / by[b][field] if a in by and b in by else None
        checks = [("selfdistill-cached / sft tokens/s", ratio("selfdistill-cached", "sft", "tokens_per_s"), ">=", 0.95),
                  ("selfdistill-cached / sft peak mem", ratio("selfdistill-cached", "sft", "peak_mem_bytes"), "<=", 1.05),
                  ("selfdistill-cached / sft peak mem above start", ratio("selfdistill-cached", "sft", "peak_mem_delta_bytes"), "<=", 1.05),
                  ("selfdistill-live / sft tokens/s", ratio("selfdistill-live", "sft", "tokens_per_s"), ">=", 0.72),
                  ("selfdistill-cached / trl-gkd tokens/s", ratio("selfdistill-cached", "trl-gkd", "tokens_per_s"), ">=", 1.5),
                  ("selfdistill-cached / trl-gkd peak mem", ratio("selfdistill-cached", "trl-gkd", "peak_mem_bytes"), "<=", 0.7),
                  ("selfdistill-cached / trl-gkd peak mem above start", ratio("selfdistill-cached", "trl-gkd", "peak_mem_delta_bytes"), "<=", 0.7),
                  ("selfdistill-live / trl-gkd tokens/s", ratio("selfdistill-live", "trl-gkd", "tokens_per_s"), ">=", 1.5)]
        for name, value, op, target in checks:
            if value is not None:
                met = value >= target if op == ">=" else value <= target
                out.append({"model": key[0], "batch_size": key[1], "ratio": name, "value": value, "target": f"{op} {target}", "met": met})
    return out


def today_ratios(rows: list[dict]) -> list[dict]:
    """Issue 16's targets, new code / TODAY's, per method, model size, batch size and precision: peak memory at batch
    64 <= 0.5, the memory a step allocates beyond weights, gradients and optimizer state <= 0.3, tokens/s >= 1."""
    ok = [r for r in rows if "error" not in r]
    out = []
    for new in (r for r in ok if r.get("code") == "new"):
        today = next((r for r in ok if r.get("code") == "today" and all(r[k] == new[k] for k in ("method", "model", "batch_size", "precision"))), None)
        if today is None:
            continue
        checks = [("peak mem", "peak_mem_bytes", "<=", 0.5 if new["batch_size"] >= 64 else None),
                  ("step memory beyond weights, grads, optimizer", "step_alloc_bytes", "<=", 0.3), ("tokens/s", "tokens_per_s", ">=", 1.0)]
        for name, key, op, target in checks:
            value = new[key] / today[key] if new.get(key) and today.get(key) else None
            met = None if value is None or target is None else (value >= target if op == ">=" else value <= target)
            out.append({"method": new["method"], "model": new["model"], "batch_size": new["batch_size"], "precision": new["precision"],
                        "ratio": f"new / today {name}", "value": value, "target": f"{op} {target}" if target else "", "met": met})
    return out


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# sftguard bench ({meta['device_name']}, {meta['threads']} threads, {meta['when']})", "",
             f"`{meta['command']}`", "",
             f"| method | code | precision | model | params | batch (B x mean T) | tokens/s | step ms | {'max allocated' if meta['device'].startswith('cuda') else 'peak RSS'} MB "
             "| peak above start MB | step beyond weights+grads+optimizer MB | teacher cache MB (build s) |"
             + (" MFU |" if meta["peak_flops"] else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if meta["peak_flops"] else "")]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r.get('code', '')} | {r.get('precision', '')} | {r.get('model', '')} | | {r.get('batch_size', '')} "
                         f"| not run: {r['error']} | | | | | |")
            continue
        cache = f"{mb(r['cache_bytes'])} ({r['cache_s']:.2f})" if r.get("cache_s") is not None else "–"
        lines.append(f"| {r['method']} | {r.get('code', 'new')} | {r.get('precision', '')} | {r['model']} | {r['model_params'] / 1e6:.2f}M | {r['batch']} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {mb(r['peak_mem_bytes'])} | {mb(r['peak_mem_delta_bytes'])} | "
                     f"{mb(r.get('step_alloc_bytes'))} | {cache} |"
                     + (f" {100 * r['mfu']:.1f}% |" if meta["peak_flops"] else ""))
    lines += ["", "| ratio | model | batch size | value | target | met |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['ratio']} | {c['model']} | {c['batch_size']} | {c['value']:.2f} | {c['target']} | {'yes' if c['met'] else 'no'} |"
              for c in result["ratios"]]
    if result.get("today_ratios"):
        lines += ["", f"| new / today ({meta.get('today')}) | method | model | batch size | precision | value | target | met |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['ratio']} | {c['method']} | {c['model']} | {c['batch_size']} | {c['precision']} | "
                  f"{'–' if c['value'] is None else format(c['value'], '.2f')} | {c['target']} | {'' if c['met'] is None else 'yes' if c['met'] else 'no'} |"
                  for c in result["today_ratios"]]
    if result["generation"]:  # none with --no_generation
        lines += ["", "| generation | model | params | eval questions/s | SliCK facts/s | peak mem MB |", "|---|---|---|---|---|---|"]
    for g in result["generation"]:
        if "error" in g:
            lines.append(f"| generation | {g.get('model', '')} | | not run: {g['error']} | | |")
        else:
            lines.append(f"| greedy eval; SliCK {g['slick_prompts_per_fact']} prompts + {g['slick_samples']} samples | {g['model']} | "
                         f"{g['model_params'] / 1e6:.2f}M | {g['eval_questions_per_s']:.1f} | {g['slick_facts_per_s']:.2f} | {mb(g['peak_mem_bytes'])} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one model size, one batch shape, fewer repeats: under a minute on an idle 2-core CPU")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for bench.json and bench.md")
    p.add_argument("--cache", default=str(REPO / ".cache" / "bench"), help="where the world and tokenizer are kept between runs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--sizes", default="", help="comma-joined model sizes (s,m,l,xl); default s,m on CPU, s,m,l,xl on CUDA")
    p.add_argument("--batch_sizes", default="", help="comma-joined QA pairs per step; default 16,64")
    p.add_argument("--methods", default="", help="comma-joined subset of: " + ", ".join(METHODS))
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per repeat (default 6; --quick 4)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats after one warm-up repeat, per process (default 2; --quick 3)")
    p.add_argument("--rounds", type=int, default=0, help="fresh processes per configuration, interleaved (default 2; --quick 1)")
    p.add_argument("--facts", type=int, default=1000, help="training facts (the default preset's stage 2: 500 known + 500 unknown)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the student (and TRL's model) first")
    p.add_argument("--peak_flops", type=float, default=0, help="peak FLOP/s for MFU; default: known bf16 peak of the GPU, none on CPU")
    p.add_argument("--no_generation", action="store_true", help="skip the generation throughput")
    p.add_argument("--codes", default="new", help=f"comma-joined: new (this checkout) and/or today (git {TODAY}, before issue 16), side by side")
    p.add_argument("--precisions", default="", help="comma-joined sftguard --precision values (fp32, bf16); default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--bf16_methods", default="", help="with bf16 in --precisions: only these methods get bf16 rows (default all)")
    p.add_argument("--cpu_mmap_threshold", type=int, default=MMAP_THRESHOLD,
                   help="CPU: glibc mmap threshold in bytes, fixed so that peak RSS follows live tensors; 0 = glibc's default")
    return p.parse_args(argv)


CONTEXT = None  # the forkserver context, set in main


def main(argv=None):
    global CONTEXT
    args = parse_args(argv)
    wall = time.perf_counter()
    CONTEXT = mp.get_context("forkserver")
    # The server imports these once; each configuration forks from it, so no process pays the imports again
    # and none inherits another's memory.
    CONTEXT.set_forkserver_preload(["__main__", "torch", "transformers", "datasets", "sftguard", "transformers.models.llama.modeling_llama"]
                                        + (["trl.experimental.gkd"] if "trl-gkd" in (args.methods or "trl-gkd") else []))
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    cuda = device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine()) + f", {os.cpu_count()} cores"
    peak_flops = args.peak_flops or (next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), 0) if cuda else 0)
    sizes = (args.sizes or ("s" if args.quick else "s,m,l,xl" if cuda else "s,m")).split(",")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("32" if args.quick else "16,64")).split(",")]
    methods = (args.methods or ",".join(m for m in METHODS if not (args.quick and m in QUICK_SKIPS))).split(",")
    unknown = [m for m in methods if m not in METHODS] + [s for s in sizes if s not in SIZES]
    if unknown:
        sys.exit(f"error: unknown method or size {', '.join(unknown)}; methods: {', '.join(METHODS)}; sizes: {', '.join(SIZES)}")
    steps, repeats = args.steps or (4 if args.quick else 6), args.repeats or (3 if args.quick else 2)
    rounds = args.rounds or (1 if args.quick else 2)

    setup = prepare(Path(args.cache), args.facts)
    common = {"device": device, "threads": args.threads, "tokenizer": setup["tokenizer"], "facts": setup["facts"],
              "steps": steps, "repeats": repeats, "compile": args.compile,
              "mmap_threshold": args.cpu_mmap_threshold}
    # Rounds go over every configuration in turn, so a change in the machine's load touches all methods alike.
    # Peak memory comes from one more process per configuration (after the rounds: memory does not depend on load).
    codes, precisions = args.codes.split(","), (args.precisions or ("bf16" if cuda else "fp32")).split(",")
    bf16_methods = args.bf16_methods.split(",") if args.bf16_methods else methods
    configs = [(size, b, m, code, prec) for size, b, m in itertools.product(sizes, batch_sizes, methods) for code in codes
               for prec in precisions if not (code != "new" and m.startswith("trl")) and (prec != "bf16" or m in bf16_methods)]
    if "today" in codes:
        common["today_path"] = extract_today(Path(tempfile.mkdtemp(prefix="sftguard-today-")))
    runs, memory = {config: [] for config in configs}, {}
    for round_no, config in [*itertools.product(range(1, rounds + 1), configs), *(("memory", c) for c in configs)]:
        size, batch_size, method, code, precision = config
        spec = {**common, "size": size, "batch_size": batch_size, "method": method, "code": code, "precision": precision,
                "phase": "memory" if round_no == "memory" else "time"}
        method = f"{method} [{code} {precision}]"
        row = run_isolated(trl_worker if method.startswith("trl-gkd") else train_worker, spec)
        if round_no == "memory":
            memory[config] = row
            print(f"memory    {method:20s} {size:3s} B={batch_size:<4d} " + (f"error: {row['error']}" if "error" in row else
                  f"peak {mb(row['peak_mem_bytes'])} MB (+{mb(row['peak_mem_delta_bytes'])})"), flush=True)
            continue
        runs[config].append(row)
        print(f"round {round_no}/{rounds} {method:20s} {size:3s} B={batch_size:<4d} " + (f"error: {row['error']}" if "error" in row else
              f"{sum(row['repeat_tokens']) / sum(row['repeat_s']):10,.0f} tok/s"), flush=True)
    rows = [merge_rounds(runs[config], memory[config], peak_flops) for config in configs]
    generation = []
    if not args.no_generation:
        for size in sizes:
            spec = {**common, "size": size, "method": "generation", "batch_size": 32, "repeats": 1 if args.quick else 3,
                    "questions": 32 if args.quick else 256, "slick_facts": 4 if args.quick else 32}
            generation.append(run_isolated(generation_worker, spec))
            g = generation[-1]
            print(f"generation {size}: " + (f"error: {g['error']}" if "error" in g else
                  f"eval {g['eval_questions_per_s']:.1f} questions/s, SliCK {g['slick_facts_per_s']:.2f} facts/s"), flush=True)
    result = {"meta": {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:])),
                       "device": device, "device_name": device_name, "threads": args.threads, "torch": torch.__version__,
                       "sizes": {s: SIZES[s] for s in sizes}, "facts": len(setup["facts"]), "steps_per_repeat": steps,
                       "repeats": repeats, "rounds": rounds, "compile": args.compile, "peak_flops": peak_flops or None,
                       "cpu_mmap_threshold": None if cuda else args.cpu_mmap_threshold, "today": TODAY if "today" in codes else None,
                       "load_average": os.getloadavg(), "when": time.strftime("%Y-%m-%d %H:%M"),
                       "wall_s": time.perf_counter() - wall},
              "rows": rows, "ratios": ratios(rows), "today_ratios": today_ratios(rows), "generation": generation}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'} ({time.perf_counter() - wall:.0f} s)")


if __name__ == "__main__":
    main()

"""sftguard: why fine-tuning on new facts makes a model forget old ones, and how self-distillation fixes it.

A single-file reimplementation of Kaplan, Gekhman, Zhu, Rozner, Reif, Swayamdipta, Hoiem, Schwartz,
"Why Fine-Tuning Encourages Hallucinations and How to Fix It" (arXiv 2604.15574, 2026). It reads in two passes:

  Part I, the paper (read first, beside it; sections follow its order)
    0. Configuration          one dataclass per --help group, composed into one Config; presets as named overrides
    1. Facts and answering    QA facts, exact match, batched greedy / sampled answering
    2. The base model         a local Hugging Face causal LM, or a small one pretrained here on the world
    3. Fact splitting (SliCK) HighlyKnown / MaybeKnown / WeaklyKnown / Unknown -> D_known, D_unknown, D_held
    4. Training               the losses (CE, self-distillation Eq. 1-2, L2 pull), freezing, the one loop train()
    5. Stage 1                task-format learning on D_known; the snapshot is the frozen teacher
    6. Stage 2                factual SFT on D_known + D_unknown by each method; 6b. results; main
  Part II, why SFT forgets (7, 7b, 7c): the hypothesis experiments, drift, the gradient-matched L2 control, their report;
    where forgetting comes from (the first epoch's shock, its residue, the later drift)
  Part III, engineering (8-16, skip on a first read): the fast self-distillation path and teacher caches (tested
    equal to Eq. 1-2), SliCK's samples with one prefill per prompt (8b), parameter groups, precision and memory,
    checkpoints and atomic writes, input checks, --sweep / --seeds, the practitioners' tools (--audit, --screen, the
    loss in a Trainer), the command line, more than one process (torchrun)

    python sftguard.py --method selfdistill          # the paper's fix
    python sftguard.py --method all                  # every method from one shared teacher
    python sftguard.py --preset smoke --method sft   # seconds, for tests
    python sftguard.py --experiment all              # why SFT forgets: name-like vs UUID keys, width, cloning
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import hashlib
import inspect
import json
import math
import os
import random
import re
import shutil
import statistics
import string
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data_prep
from data_prep import QA_PROMPT, qa_text


# #####################################################################################################
# PART I. THE PAPER: read this first, beside the paper.
#   Configuration -> facts -> base model -> SliCK split -> the losses and one training loop -> stage 1 ->
#   stage 2 -> results -> main. What the paper does not describe (fast paths, caches, checks, resume) is one
#   line here that calls into Part III.
# #####################################################################################################


# =====================================================================================================
# 0. Configuration: one dataclass, a help line per field, presets as named overrides
# =====================================================================================================
@dataclass
class StudyArgs:
    """The study: which method(s), on which preset and seed, written where."""
    _argument_group_name = "study"  # its --help heading (HfArgumentParser)
    method: str = field(default="selfdistill", metadata={"help": "sft | selfdistill | freeze | known_only | l2 | all (one teacher)"})
    preset: str = field(default="default", metadata={"help": "smoke (seconds) | ci (tests) | default | realistic | large (GPU)"})
    seed: int = field(default=0, metadata={"help": "seed of the splits, few-shot prompts and training (not of world, base model)"})
    out: str = field(default="", metadata={"help": "output folder; empty: runs/<preset>/<method>-seed<seed>(-2, -3, ...)"})
    sweep: str = field(default="", metadata={"help": "a frontier from one teacher: kl_weight=0,0.25,1 | temperature=... | l2_weight=..."})
    seeds: str = field(default="", metadata={"help": "run once per seed (e.g. 0,1,2) into <out>/seed<N>; mean and sd in seeds.md"})


@dataclass
class DataModelArgs:
    """Data and model: the facts, and the base model (--model, or one pretrained here on the synthetic world)."""
    _argument_group_name = "data and model"  # its --help heading (HfArgumentParser)
    data: str = field(default="", metadata={"help": "folder written by data_prep.py; empty: data/world-<preset>, built on first use"})
    model: str = field(default="", metadata={"help": "a local Hugging Face causal LM folder; empty: pretrain one on the world (cached)"})
    arch: str = field(default="llama", metadata={"help": "llama | gpt2: the architecture of the model pretrained on the world"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=128, metadata={"help": "hidden width"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    n_kv_head: int = field(default=0, metadata={"help": "llama: key/value heads (grouped-query attention); 0 = n_head"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP width / hidden width (the MLPs are where facts are stored)"})
    vocab_size: int = field(default=1024, metadata={"help": "byte-level BPE vocabulary trained on the corpus"})
    pretrain_epochs: int = field(default=60, metadata={"help": "passes over the pretraining corpus"})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "peak learning rate of pretraining"})
    pretrain_batch_size: int = field(default=32, metadata={"help": "sequences of pretrain_block tokens per step"})
    pretrain_block: int = field(default=128, metadata={"help": "tokens per pretraining sequence (documents are packed)"})


@dataclass
class SlickArgs:
    """SliCK knowledge categories (Gekhman et al. 2024: 10 prompts x (1 greedy + 16 samples), 4-shot) and the splits."""
    _argument_group_name = "SliCK"  # its --help heading (HfArgumentParser)
    slick_prompts: int = field(default=4, metadata={"help": "random few-shot prompts per fact (paper: 10)"})
    slick_shots: int = field(default=4, metadata={"help": "exemplars of the same relation per prompt (paper: 4)"})
    slick_samples: int = field(default=4, metadata={"help": "samples per prompt, only where greedy is never right (paper: 16)"})
    slick_temperature: float = field(default=0.5, metadata={"help": "sampling temperature (paper: 0.5)"})
    slick_top_k: int = field(default=40, metadata={"help": "top-k of sampling (paper: 40)"})
    slick_max_facts: int = field(default=4000, metadata={"help": "categorise at most this many facts (a random sample); 0 = all"})
    n_known: int = field(default=500, metadata={"help": "|D_known|: Known facts for task-format learning and stage 2"})
    n_unknown: int = field(default=500, metadata={"help": "|D_unknown|: Unknown facts, the new knowledge of stage 2"})
    n_held: int = field(default=300, metadata={"help": "|D_held|: HighlyKnown facts never trained on, the forgetting probe"})
    n_val: int = field(default=100, metadata={"help": "Known facts of other entities that stop stage 1 early"})


@dataclass
class TrainingArgs:
    """Training: stage 1 (task format), stage 2 (factual SFT), freezing, the L2 control, evaluation."""
    _argument_group_name = "training"  # its --help heading (HfArgumentParser)
    stage1_epochs: int = field(default=10, metadata={"help": "at most this many epochs on D_known (paper: 1), early-stopped on D_val"})
    stage1_lr: float = field(default=1e-4, metadata={"help": "learning rate of stage 1"})
    stage1_patience: int = field(default=2, metadata={"help": "stop stage 1 after this many epochs without a better validation accuracy"})
    epochs: int = field(default=12, metadata={"help": "epochs of stage 2 on D_known + D_unknown"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of stage 2 (paper: 5e-5 for 1.5B-8B models)"})
    batch_size: int = field(default=32, metadata={"help": "QA pairs per step"})
    warmup_frac: float = field(default=0.05, metadata={"help": "fraction of steps of linear warm-up (then cosine to a tenth of the peak)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})
    trainable: str = field(default="attn", metadata={"help": "freeze trains: attn | mlp | embed | norm | all | layers:0,1 | regex | a,b"})
    l2_weight: float = field(default=1.0, metadata={"help": "l2: alpha in CE + alpha * ||theta - theta_teacher||^2"})
    unknown_answer: str = field(default="", metadata={"help": "train D_unknown with this answer (e.g. \"I don't know\"); report how often"})
    eval_max: int = field(default=400, metadata={"help": "evaluate each split on at most this many facts (a fixed random subset)"})
    eval_batch_size: int = field(default=256, metadata={"help": "prompts per generation batch"})


@dataclass
class SelfDistillationArgs:
    """Self-distillation (Eq. 1-2): CE + lambda * tau^2 * KL(teacher_tau || student_tau) on the answer tokens."""
    _argument_group_name = "self-distillation"  # its --help heading (HfArgumentParser)
    kl_weight: float = field(default=1.0, metadata={"help": "lambda, the weight of the KL term (paper: 1)"})
    temperature: float = field(default=0.5, metadata={"help": "tau, the softening temperature of both distributions (paper: 0.5)"})
    teacher_cache: str = field(default="auto", metadata={"help": "auto | hidden | fp32 | bf16 | topk | live: how the teacher is computed"})
    teacher_cache_max_mb: int = field(default=1024, metadata={"help": "--teacher_cache auto: the largest fp32 cache kept, MB"})
    teacher_topk: int = field(default=64, metadata={"help": "--teacher_cache topk: teacher tokens kept per answer token"})
    kl_chunk: int = field(default=32, metadata={"help": "answer tokens per chunk of the fast loss; 0: the plain Eq. 1-2 function"})


@dataclass
class ExperimentArgs:
    """Why SFT forgets: the hypothesis experiments."""
    _argument_group_name = "experiments (why SFT forgets)"  # its --help heading (HfArgumentParser)
    experiment: str = field(default="", metadata={"help": "interference | capacity | cloning | all: hypothesis experiments, not --method"})
    exp_counts: str = field(default="100,300,1000", metadata={"help": "synthetic new facts per condition (comma list; paper: 1e3..1e6)"})
    exp_widths: str = field(default="", metadata={"help": "capacity: hidden widths besides --n_embd (comma list); empty: 3/4 n_embd"})
    exp_relation: str = field(default="country", metadata={"help": "the one relation of the synthetic new facts (the paper's P17 analogue)"})
    exp_fit_epochs: int = field(default=0, metadata={"help": "cloning: most epochs to fit UUID keys to name keys' accuracy; 0: 3 x --epochs"})


# Config (Part III, section 15) composes these groups with the practitioners' and the engineering flags into the one
# object the code reads (cfg.lr, cfg.kl_weight, ...); --help shows a group per dataclass, engineering last.


# Presets are small sets of overrides, as in nanoGPT; flags given on the command line win.
PRESETS = {
    "smoke": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, pretrain_epochs=40, pretrain_lr=5e-3,
                  pretrain_block=64, pretrain_batch_size=16,
                  slick_prompts=2, slick_shots=2, slick_samples=2, n_known=30, n_unknown=30, n_held=20, n_val=10,
                  stage1_epochs=2, epochs=2, stage1_lr=3e-4, lr=3e-4, eval_max=60, exp_counts="10,30,100", exp_widths="96"),
    "default": dict(),
    "realistic": dict(),  # the default model and study on data_prep's realistic world (skewed answers, a long tail, ...)
    "large": dict(n_layer=8, n_embd=256, n_head=8, vocab_size=2048, pretrain_epochs=60, slick_prompts=10, slick_samples=16,
                  slick_max_facts=0, n_known=3000, n_unknown=3000, n_held=2000, n_val=300, eval_max=2000, batch_size=64),
    # ci: a reduced world (data_prep.WORLD_PRESETS["ci"]) and model on which plain SFT still clearly forgets more than
    # self-distillation (tests/test_central_finding.py, 3-4 minutes on a 2-core CPU). Stage 2 keeps the default lr and epochs.
    "ci": dict(n_layer=2, n_embd=128, n_head=4, vocab_size=768, slick_prompts=2, slick_samples=2,
               n_known=200, n_unknown=400, n_held=150, n_val=40),
}


METHODS = ("sft", "selfdistill", "freeze", "known_only", "l2")


# --method all: every method once from the same teacher; freeze twice, as in the paper's Table 1.
ALL_RUNS = (("known_only", None), ("sft", None), ("selfdistill", None), ("freeze", "attn"), ("freeze", "mlp"), ("l2", None))


class UserError(Exception):
    """A mistake in the input: printed as one line with its fix, exit status 2, no traceback."""


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


# =====================================================================================================
# 1. Facts and answering: closed-book QA pairs, normalised exact match, batched generation
# =====================================================================================================
def load_facts(data_dir: Path) -> tuple[list[dict], dict]:
    """facts.jsonl (id, relation, subject, question, answers) and world.json, checked by data_prep, which owns the format."""
    return data_prep.load_facts(data_dir)


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation before exact match: case, punctuation, articles, whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, answers: list[str]) -> bool:
    guess = normalize_answer(prediction)
    return bool(guess) and guess in {normalize_answer(a) for a in answers}  # an empty answer is never right


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                     num_samples: int = 0, temperature: float = 1.0, top_k: int = 0, desc: str = "answering",
                     prefill_once: bool = True) -> list[list[str]]:
    """Answer every prompt: greedily (num_samples=0, one answer each) or with num_samples sampled answers.

    Prompts are sorted by length so that each left-padded batch wastes little compute. prefill_once=False: the plain
    generate() for sampled answers (the fast path of Part III, §8b, gives the same answers)."""
    from transformers import GenerationConfig

    model.eval()
    tokenizer.padding_side = "left"
    sampling = num_samples > 0
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, num_return_sequences=max(1, num_samples),
                                  temperature=temperature if sampling else None, top_k=top_k if sampling else None,
                                  top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[str]] = [[] for _ in prompts]
    per_prompt = max(1, num_samples)
    batch_size = max(1, batch_size // per_prompt)
    def answer_batch(start):  # a list of answers per prompt of the batch starting at `start`
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        synced = {"synced_gpus": True} if is_sharded(model) else {}  # FSDP2: every rank in every forward pass (§16)
        if sampling and prefill_once:  # the same answers, each prompt's prefill computed once (Part III, §8b)
            out = generate_prefilling_once(model, enc, gen_config, **synced)
        else:
            out = model.generate(**enc, generation_config=gen_config, **synced)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [[t.split("\n")[0].strip() for t in texts[j * per_prompt:(j + 1) * per_prompt]] for j in range(len(idx))]

    # generate() fills every field left unset from model.generation_config, i.e. the checkpoint's generation_config.json
    # (top_p, repetition or n-gram penalties, forced / suppressed / bad tokens, min_length, ...). An empty one in its
    # place leaves only transformers' neutral defaults: the answers follow the protocol whatever the checkpoint ships.
    shipped, model.generation_config = model.generation_config, GenerationConfig()
    try:
        starts = range(0, len(order), batch_size)
        # ranks share the greedy batches; sampling draws one stream of random numbers, as one process does (§16)
        results = sampled_as_one_process(answer_batch, starts, desc) if sampling else on_ranks(answer_batch, starts, model, desc)
        for start, batch_answers in zip(starts, results):
            for i, a in zip(order[start:start + batch_size], batch_answers):
                answers[i] = a
    finally:
        model.generation_config = shipped
    return answers


MAX_ANSWER_TOKENS = 48  # EntityQuestions' longest alias is 88 characters: 48 tokens hold it even at 2 characters a token


def max_answer_tokens(tokenizer, facts: list[dict]) -> int:
    """New tokens to generate: enough for every alias (a model may answer with any of them), plus the stop token."""
    aliases = [" " + a for f in facts for a in f["answers"]]  # " " + a: as many tokens as in context, or one more
    longest = max(map(len, tokenizer(aliases, add_special_tokens=False)["input_ids"]))
    return min(MAX_ANSWER_TOKENS, longest + 2)


def greedy_answers(model, tokenizer, facts: list[dict], cfg: Config, desc: str = "eval") -> list[str]:
    """Each fact's question asked zero-shot, answered greedily (accuracy() and --audit score these)."""
    prompts = [QA_PROMPT.format(question=f["question"]) for f in facts]
    with model_precision(model, cfg).autocast():  # evaluated as it trains
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_answer_tokens(tokenizer, facts),
                                   batch_size=cfg.eval_batch_size, desc=desc)
    return [a[0] for a in answers]


def accuracy(model, tokenizer, facts: list[dict], cfg: Config, desc: str = "eval") -> float:
    """Greedy zero-shot exact match, the paper's accuracy on D_known, D_unknown and D_held."""
    if not facts:
        return float("nan")
    answers = greedy_answers(model, tokenizer, facts, cfg, desc)
    return sum(is_correct(a, f["answers"]) for a, f in zip(answers, facts)) / len(facts)


# =====================================================================================================
# 2. The base model: a local HF causal LM, or a small one pretrained here on the synthetic world
# =====================================================================================================
def load_base_model(cfg: Config, data_dir: Path, world: dict, device: torch.device):
    """(model, tokenizer, path): --model, or a small model pretrained here on the synthetic world (cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model:  # checked as it loads (Part III, §12)
        model, tokenizer, path = load_local_model(cfg)
    else:
        if world.get("source") != "synthetic":
            raise UserError(f"the data in {data_dir} has no pretraining corpus; pass --model PATH (a local Hugging Face causal LM)")
        path = pretrain_base_model(cfg, data_dir, world)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    check_loaded_model(model, tokenizer, cfg, device)  # Part III, §12; sets a missing pad token to end-of-text
    return model.to(device), tokenizer, path


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the corpus, so names split into the sub-word pieces they share."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")


def make_model_config(cfg: Config, tokenizer):
    from transformers import GPT2Config, LlamaConfig

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    if cfg.arch == "gpt2":
        return GPT2Config(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_inner=cfg.mlp_ratio * cfg.n_embd,
                          n_positions=512, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    return LlamaConfig(num_hidden_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head or cfg.n_head, intermediate_size=cfg.mlp_ratio * cfg.n_embd,
                       max_position_embeddings=512, **ids)


PRETRAIN_WARMUP_FRAC, PRETRAIN_GRAD_CLIP = 0.05, 1.0


def pretrain_base_model(cfg: Config, data_dir: Path, world: dict) -> Path:
    """Pretrain a randomly initialised causal LM on the world's corpus (cached by world and model config).

    The corpus states the known entities' facts in prose (and, for some, in QA form); the new entities
    never appear. Documents are packed into blocks, as in nanoGPT, and every token is a target."""
    from transformers import AutoModelForCausalLM

    cache = Path(cfg.cache_dir) / f"base-{base_model_key(cfg, world)}"
    if (cache / "config.json").is_file() or restore_shipped_base_model(cfg, world, cache):  # shipped: Part III, §12
        return cache
    texts = [json.loads(line)["text"] for line in (data_dir / "pretrain.jsonl").read_text().splitlines() if line.strip()]
    seed_everything(0)  # the base model is a property of the world, not of the run's seed
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    model = AutoModelForCausalLM.from_config(make_model_config(cfg, tokenizer))
    docs = [ids + [tokenizer.eos_token_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    print(f"pretraining a {count_params(model) / 1e6:.2f}M-parameter {cfg.arch} on {sum(map(len, docs))} tokens "
          f"x {cfg.pretrain_epochs} epochs (once; cached in {cache})")

    def packed_epoch(generator):
        order = torch.randperm(len(docs), generator=generator).tolist()
        stream = torch.tensor([t for i in order for t in docs[i]])
        n_blocks = len(stream) // cfg.pretrain_block
        blocks = stream[: n_blocks * cfg.pretrain_block].view(n_blocks, cfg.pretrain_block)
        for start in range(0, n_blocks, cfg.pretrain_batch_size):
            block = blocks[start:start + cfg.pretrain_batch_size]
            yield {"input_ids": block, "attention_mask": torch.ones_like(block), "labels": block}

    # Pretraining's own warm-up and clipping (the fine-tuning flags --warmup_frac / --grad_clip must not change the
    # base model, which is cached by the pretraining config alone).
    train(model, packed_epoch, next_token_loss, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr,
          cfg=replace(cfg, warmup_frac=PRETRAIN_WARMUP_FRAC, grad_clip=PRETRAIN_GRAD_CLIP), desc="pretrain", weight_decay=0.1)
    save_hf_model(model, tokenizer, cache)
    return cache


def count_params(model, trainable_only=False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# =====================================================================================================
# 3. Fact splitting: SliCK knowledge categories (Gekhman et al. 2024) -> D_known, D_unknown, D_held
# =====================================================================================================
CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")


def slick_category(greedy_correct: list[bool], sampled_correct: list[bool]) -> str:
    """HighlyKnown: greedy always right; MaybeKnown: greedy sometimes; WeaklyKnown: greedy never but a
    sample sometimes; Unknown: never."""
    if all(greedy_correct):
        return "HighlyKnown"
    if any(greedy_correct):
        return "MaybeKnown"
    return "WeaklyKnown" if any(sampled_correct) else "Unknown"


def few_shot_prompt(fact: dict, exemplars: list[dict]) -> str:
    shots = "".join(qa_text(e["question"], e["answers"][0]) + "\n\n" for e in exemplars)
    return shots + QA_PROMPT.format(question=fact["question"])


def categorize_facts(model, tokenizer, facts: list[dict], cfg: Config, rng: random.Random) -> dict[str, str]:
    """Ask the base model each fact with slick_prompts random few-shot prompts (exemplars: other facts of
    the same relation), once greedily and, where greedy never succeeds, slick_samples times at T."""
    by_relation = defaultdict(list)
    for f in facts:
        by_relation[f["relation"]].append(f)
    prompts = []
    for f in facts:
        pool = [e for e in rng.sample(by_relation[f["relation"]], min(len(by_relation[f["relation"]]), 4 * cfg.slick_shots + 1))
                if e["subject"] != f["subject"]]
        prompts += [few_shot_prompt(f, rng.sample(pool, min(cfg.slick_shots, len(pool)))) for _ in range(cfg.slick_prompts)]
    max_new = max_answer_tokens(tokenizer, facts)
    greedy = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.eval_batch_size, desc="SliCK greedy")
    k = cfg.slick_prompts
    greedy_ok = [[is_correct(greedy[i * k + j][0], f["answers"]) for j in range(k)] for i, f in enumerate(facts)]
    # Sampling only separates WeaklyKnown from Unknown, so it is spent only where greedy never succeeded.
    never = [i for i, ok in enumerate(greedy_ok) if not any(ok)]
    sampled_ok = {i: [] for i in range(len(facts))}
    if never and cfg.slick_samples > 0:
        sample_prompts = [prompts[i * k + j] for i in never for j in range(k)]
        sampled = generate_answers(model, tokenizer, sample_prompts, max_new_tokens=max_new, batch_size=cfg.eval_batch_size,
                                   num_samples=cfg.slick_samples, temperature=cfg.slick_temperature, top_k=cfg.slick_top_k,
                                   desc="SliCK samples", prefill_once=cfg.prefill_once)
        for n, i in enumerate(never):
            sampled_ok[i] = [is_correct(a, facts[i]["answers"]) for j in range(k) for a in sampled[n * k + j]]
    return {f["id"]: slick_category(greedy_ok[i], sampled_ok[i]) for i, f in enumerate(facts)}


def category_pool(facts: list[dict], cfg: Config) -> list[dict]:
    """The facts the study categorises: name-key facts (UUID keys are the experiments'), at most slick_max_facts."""
    pool = [f for f in facts if f.get("key") != "uuid"]
    if cfg.slick_max_facts and len(pool) > cfg.slick_max_facts:
        pool = random.Random(0).sample(pool, cfg.slick_max_facts)
    return pool


def subjects_named_nowhere_else(by_subject: dict[str, list[dict]]) -> set[str]:
    """The subjects that may be held out: no other subject's fact has it as its subject or answer, and none of its
    answers is another subject (answers shared with other facts, e.g. one country, are allowed: they are the values).
    Whatever role the other subjects get, no held-out fact then shares an entity with a trained one (EntityQuestions:
    "Paris" is asked about in one relation and the answer of another)."""
    as_subject, as_answer = defaultdict(set), defaultdict(set)  # normalised text -> the subjects whose facts hold it
    for subject, subject_facts in by_subject.items():
        as_subject[normalize_answer(subject)].add(subject)
        for a in {a for f in subject_facts for a in f["answers"]}:
            as_answer[normalize_answer(a)].add(subject)
    return {subject for subject, subject_facts in by_subject.items()
            if as_subject[normalize_answer(subject)] | as_answer[normalize_answer(subject)] <= {subject}
            and all(as_subject[normalize_answer(a)] <= {subject} for f in subject_facts for a in f["answers"])}


def split_facts(facts: list[dict], categories: dict[str, str], cfg: Config, rng: random.Random) -> dict[str, list[dict]]:
    """D_held: HighlyKnown facts of entities never trained on; D_val: Known facts of other untrained
    entities (stops stage 1); D_known / D_unknown: Known / Unknown facts of the training entities.

    Entities, not facts, are assigned to roles, so no held-out entity appears in training, not even as another
    fact's answer (subjects_named_nowhere_else)."""
    by_subject = defaultdict(list)
    for f in facts:
        if f["id"] in categories:
            by_subject[f["subject"]].append(f)
    subjects = sorted(by_subject)
    rng.shuffle(subjects)
    can_hold = subjects_named_nowhere_else(by_subject)
    want = {"held": cfg.n_held or 10**9, "val": cfg.n_val or 10**9, "known": cfg.n_known or 10**9, "unknown": cfg.n_unknown or 10**9}
    splits = {name: [] for name in want}
    for subject in subjects:
        highly = [f for f in by_subject[subject] if categories[f["id"]] == "HighlyKnown"]
        known = [f for f in by_subject[subject] if categories[f["id"]] != "Unknown"]
        unknown = [f for f in by_subject[subject] if categories[f["id"]] == "Unknown"]
        if highly and subject in can_hold and len(splits["held"]) < want["held"]:
            splits["held"] += highly[: want["held"] - len(splits["held"])]
        elif known and len(splits["val"]) < want["val"]:
            splits["val"] += known[: want["val"] - len(splits["val"])]
        else:
            splits["known"] += known[: max(0, want["known"] - len(splits["known"]))]
            splits["unknown"] += unknown[: max(0, want["unknown"] - len(splits["unknown"]))]
    for name, size in (("held", cfg.n_held), ("val", cfg.n_val), ("known", cfg.n_known), ("unknown", cfg.n_unknown)):
        if len(splits[name]) == 0 and size == 0:  # 0 asks for all there are, and there are none
            raise UserError(f"the {name} split came out empty (no fitting facts among the {len(facts)} categorised); "
                            f"use more data or a larger --slick_max_facts")
        if len(splits[name]) == 0 or len(splits[name]) < size:
            raise UserError(f"only {len(splits[name])} facts for the {name} split where --n_{name} {size} were asked; "
                            f"lower --n_{name} or use more data")
    return splits


# =====================================================================================================
# 4. Training: the losses, freezing, and the one loop every stage and method uses
# =====================================================================================================
# Every loss takes the logits of the target tokens only, [N, V], and their targets [N]: train() runs the output layer
# on those positions alone (labels != -100 after the shift; the prompt and padding are no targets), so no
# [batch, positions, vocabulary] tensor exists (see answer_logits).
def next_token_loss(logits, targets, batch=None):
    """Cross-entropy of the target tokens: logits [N, V], targets [N]."""
    return F.cross_entropy(logits.float(), targets)


def self_distillation_loss(student_logits, teacher_logits, targets, kl_weight: float, temperature: float):
    """Eq. 1-2:  L = CE(y, p_student) + lambda * tau^2 * KL(p_teacher^tau || p_student^tau)

    Forward KL from the frozen teacher to the student, both softened at temperature tau, summed over the
    vocabulary and averaged over answer tokens. The tau^2 keeps the KL gradient on the scale of the CE
    gradient as tau changes (Hinton et al. 2015). Logits of the N answer tokens [N, V], targets y [N].
    Returns (loss, kl)."""
    ce = F.cross_entropy(student_logits.float(), targets)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # [N, V], a fixed target
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [N, V]
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    return ce + kl_weight * temperature**2 * kl, kl


def l2_pull(model, anchor: list[torch.Tensor]) -> torch.Tensor:
    """||theta - theta_teacher||^2 over the trainable parameters: the weight-space control."""
    return sum(((p - a) ** 2).sum() for p, a in zip(trainable_parameters(model), anchor))


def set_trainable(model, spec: str) -> list[str]:
    """Freeze every parameter --trainable does not pick; the one place where freezing is decided."""
    chosen = set(chosen_parameter_names(model, spec))
    names = [n for n, _ in model.named_parameters()]
    if not chosen:
        raise UserError(f"--trainable {spec!r} matches no parameter of this {type(model).__name__}; "
                        f"names look like {names[1]!r}, {names[-2]!r}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return [n for n in names if n in chosen]


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def answer_token_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """The answer's tokens as they follow the prompt in the text 'prompt answer', i.e. what the model generates.

    Encoding " " + answer on its own differs for SentencePiece tokenizers (Llama 2, Mistral): they put a lone
    "▁" piece first, a token the model never emits after "A:"."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    if full[:len(prompt_ids)] == prompt_ids:
        return full[len(prompt_ids):]
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"]  # a tokenizer that merges across "A:" and the answer


def encode_qa(tokenizer, fact: dict) -> dict:
    """'Q: question\\nA: answer<eos>' with only the answer tokens (and end-of-text) as targets."""
    question = QA_PROMPT.format(question=fact["question"])
    prompt = tokenizer(question)["input_ids"]  # with the tokenizer's special tokens, as generate_answers sees it
    answer = answer_token_ids(tokenizer, question, fact["answers"][0]) + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


@dataclass
class QABatches:
    """A QA training set, encoded once. Called with a generator, it yields one epoch of right-padded batches in a
    fresh random order (train() calls it so); batch_of(positions) pads those examples."""
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels) per fact; labels -100 outside the answer
    batch_size: int
    pad_token_id: int

    @property
    def size(self) -> int:
        return len(self.examples)

    @property
    def steps(self) -> int:  # per epoch
        return math.ceil(self.size / self.batch_size)

    @property
    def answer_tokens(self) -> int:
        return sum(t != -100 for _, labels in self.examples for t in labels)

    def batch_of(self, index: list[int]) -> dict:
        """The examples at these positions, right-padded; "index" lets a teacher cache find their rows."""
        chunk = [self.examples[i] for i in index]
        width = max(len(ids) for ids, _ in chunk)
        pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
        return {"input_ids": torch.tensor([pad(ids, self.pad_token_id) for ids, _ in chunk]),
                "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in chunk]),
                "labels": torch.tensor([pad(lab, -100) for _, lab in chunk]), "index": torch.tensor(index)}

    def __call__(self, generator):
        order = torch.randperm(self.size, generator=generator).tolist()
        for start in range(0, self.size, self.batch_size):
            yield self.batch_of(order[start:start + self.batch_size])


def qa_batches(tokenizer, facts: list[dict], batch_size: int) -> QABatches:
    """The facts as 'Q: question\\nA: answer<eos>' examples (encode_qa), in batches of batch_size."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # one bar per training run is enough
    encoded = Dataset.from_list([{"question": f["question"], "answers": f["answers"][:1]} for f in facts]).map(
        lambda f: encode_qa(tokenizer, f), remove_columns=["question", "answers"])
    return QABatches(list(zip(encoded["input_ids"], encoded["labels"])), batch_size, tokenizer.pad_token_id)


def answer_logits(model, batch, separable: bool):
    """(logits [N, V], targets [N]) of the N target tokens (labels != -100 after the shift). separable: the model's
    logits are its output layer on its base model's last hidden states (output_layer_separable), so the output layer
    runs on the target positions alone and no [batch, positions, vocabulary] tensor exists; else the full forward."""
    labels = batch["labels"][:, 1:]
    target = labels != -100
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if separable:
        hidden = model.base_model(**inputs)[0][:, :-1]
        return model.get_output_embeddings()(hidden[target]), labels[target]
    return model(**inputs).logits[:, :-1][target], labels[target]


def get_lr(step: int, lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to lr over `warmup` steps, then cosine down to lr / 10 at `total` (as in nanoGPT)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def train(model, batches, loss_fn, *, epochs: int, lr: float, cfg: Config, desc: str, weight_decay: float = 0.0,
          on_epoch_end=None, seed: int = 0, checkpoint_dir: Path | None = None, checkpoint_extra=None,
          save_every_epoch: bool = True) -> dict:
    """The one training loop: AdamW on float32 master weights under cfg.precision's autocast, warm-up then cosine,
    clipping, a NaN guard, tokens/s.

    batches(generator) yields one epoch of batches; loss_fn(logits, targets, batch) is the method's loss on the
    target tokens' logits [N, V] and targets [N] (answer_logits); on_epoch_end(epoch) may return True to stop early.
    With checkpoint_dir, training continues after the checkpoint found there (--resume) and, if save_every_epoch, the
    state after each epoch replaces it (with checkpoint_extra(), a JSON-able dict of the caller's)."""
    device = next(model.parameters()).device
    precision = resolve_precision(cfg.precision, device)  # autocast and fp16 loss scaling (Part III, §10)
    model.float()  # master weights and AdamW state in float32 whatever the checkpoint's dtype (bf16 updates round to 0)
    separable = output_layer_separable(model, batches)  # the output layer on target tokens only? (Part III, §8)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sparse_tied_embedding_gradient(model)  # one [V, d] gradient fewer where embeddings are tied (Part III, §10)
    forward = answer_logits_on_ranks(model, separable, cfg)  # answer_logits; under torchrun via DDP / FSDP2 (Part III, §16)
    loss_fn = over_global_batch(loss_fn)  # under torchrun: each rank's share of the global batch's mean (Part III, §16)
    params = trainable_parameters(model)
    # fused: one kernel per step, without the parameter-sized temporaries of the for-each implementation
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), fused=True)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = getattr(batches, "steps", None) or sum(1 for _ in batches(torch.Generator().manual_seed(seed)))
    total, warmup = epochs * steps_per_epoch, max(1, int(cfg.warmup_frac * epochs * steps_per_epoch))
    # --resume: after the last epoch checkpoint in checkpoint_dir (Part III, §11); else from step 0, epoch 1
    step, tokens, train_seconds, first_epoch = resumed_training(checkpoint_dir, model, optimizer, generator, epochs, desc)
    bar = tqdm(total=total, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    for epoch in range(first_epoch, epochs + 1):
        model.train()
        start = time.perf_counter()
        for batch in batches(generator):
            batch = {k: v.to(device) for k, v in rank_slice(batch).items()}  # this rank's slice of it (Part III, §16)
            for group in optimizer.param_groups:
                group["lr"] = get_lr(step, lr, warmup, total)
            with precision.autocast():
                logits, targets = forward(batch)
                loss = loss_fn(logits, targets, batch)
            check_finite(loss, desc, epoch, step, bar)  # the NaN guard (Part III, §12)
            precision.backward_and_step(loss, optimizer, params, cfg.grad_clip)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(batch["attention_mask"].sum())
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
            del logits, loss  # free the vocabulary-wide logits (and the graph) before the next step's forward pass
        train_seconds += time.perf_counter() - start
        stop = bool(on_epoch_end is not None and on_epoch_end(epoch))
        if checkpoint_dir is not None and save_every_epoch:  # for --resume (Part III, §11)
            state = {"step": step, "tokens": tokens, "train_seconds": train_seconds, "stopped": stop,
                     "extra": checkpoint_extra() if checkpoint_extra is not None else None}
            save_epoch_checkpoint(checkpoint_dir, epoch, model, optimizer, generator, state, bar)
        if stop:
            break
    bar.close()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return {"tokens": tokens, "train_seconds": train_seconds, "tokens_per_s": tokens / max(train_seconds, 1e-9)}


# =====================================================================================================
# 5. Stage 1: task-format learning on D_known; its snapshot is the frozen teacher
# =====================================================================================================
def evaluate(model, tokenizer, splits: dict, cfg: Config) -> dict:
    return {f"{name}_acc": accuracy(model, tokenizer, splits[name], cfg, desc=f"eval {name}") for name in ("known", "unknown", "held")}


def eval_subsets(splits: dict, cfg: Config, rng: random.Random) -> dict:
    """Fixed random subsets (at most eval_max facts) so that every evaluation asks the same questions."""
    return {name: rng.sample(facts, min(len(facts), cfg.eval_max)) for name, facts in splits.items()}


def learn_task_format(base_model, tokenizer, splits: dict, cfg: Config, checkpoint_dir: Path | None = None):
    """Stage 1: fine-tune the base model on D_known alone, keep the epoch with the best accuracy on the
    validation split, and freeze that snapshot as the teacher. With checkpoint_dir, the teacher is saved
    to checkpoint_dir/teacher/ (with the run's config), or loaded from there if a killed run saved it."""
    model = copy.deepcopy(base_model)
    resumed = resumed_teacher(checkpoint_dir, model)  # --resume after stage 1 (Part III, §11)
    if resumed is not None:
        return freeze_as_teacher(model), resumed
    set_trainable(model, "all")
    check_room_for_checkpoints(checkpoint_dir, model, cfg)  # before stage 1, not after it (Part III, §11)
    best = {"acc": -1.0, "state": None, "epoch": 0}
    history = []

    def keep_best(epoch):
        acc = accuracy(model, tokenizer, splits["val"], cfg, desc="eval val")
        history.append({"epoch": epoch, "val_acc": acc})
        if acc > best["acc"]:
            best.update(acc=acc, epoch=epoch, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        return epoch - best["epoch"] >= cfg.stage1_patience

    train(model, qa_batches(tokenizer, splits["known"], cfg.batch_size), next_token_loss, epochs=cfg.stage1_epochs,
          lr=cfg.stage1_lr, cfg=cfg, desc="stage 1", on_epoch_end=keep_best, seed=cfg.seed)
    model.load_state_dict(best["state"])
    teacher = freeze_as_teacher(model)
    stage1 = {"best_epoch": best["epoch"], "val_acc": best["acc"], "history": history}
    save_teacher_checkpoint(checkpoint_dir, teacher, stage1, cfg)  # for --resume (Part III, §11)
    return teacher, stage1


def freeze_as_teacher(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# =====================================================================================================
# 6. Stage 2: factual SFT on D_known + D_unknown; a method changes the loss and what trains, nothing else
# =====================================================================================================
def method_loss(method: str, student, teacher, cfg: Config, batches=None):
    """The loss of each method, on the answer tokens' logits [N, V] and targets [N] (answer_logits). batches: the
    qa_batches the loss will see (a cached teacher is computed on them, once)."""
    if method == "selfdistill":
        if cfg.kl_chunk > 0:  # the default: the same loss, fast (Part III, §8; tests/test_distill_fast.py holds it equal)
            return fast_self_distillation_loss(teacher, cfg, batches)

        def loss_fn(logits, targets, batch):  # Eq. 1-2 as written, the frozen teacher run on the same batch
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            answer = batch["labels"][:, 1:] != -100  # [batch, positions - 1]: the answer tokens
            return self_distillation_loss(logits, teacher_logits[answer], targets, cfg.kl_weight, cfg.temperature)[0]
        return loss_fn
    if method == "l2":
        anchor = [p.detach().clone() for p in trainable_parameters(student)]
        return lambda logits, targets, batch: next_token_loss(logits, targets) + cfg.l2_weight * l2_pull(student, anchor)
    return next_token_loss  # sft, freeze, known_only


def run_method(method: str, trainable: str | None, teacher, tokenizer, splits, eval_sets, teacher_scores, cfg: Config,
               checkpoint_dir: Path | None = None, save_to: Path | None = None, make_loss=None) -> dict:
    """Stage 2 for one method, from a fresh copy of the teacher; evaluated after every epoch. make_loss: another builder
    of the loss than method_loss, same arguments, whose loss runs the teacher (--sweep's L2 probe). With checkpoint_dir,
    the result is saved there when done and the student after every epoch where that is cheap (--epoch_checkpoints),
    and a killed run resumes from them (or restarts the method from the teacher)."""
    finished = finished_result(checkpoint_dir, run_name(method, trainable))  # --resume (Part III, §11)
    if finished is not None:
        return finished
    started = time.perf_counter()
    seed_everything(cfg.seed)
    student = copy_model(teacher, cfg)  # copy.deepcopy; a sharded (FSDP2) teacher is copied shard by shard (Part III, §16)
    set_trainable(student, trainable if method == "freeze" else "all")
    train_facts = splits["known"] if method == "known_only" else splits["known"] + relabel_unknown(splits["unknown"], cfg.unknown_answer)
    resumed = read_checkpoint_state(checkpoint_dir)  # train() restores the weights; the curve so far is ours
    curve = resumed["extra"]["curve"] if resumed else [{"epoch": 0, **teacher_scores}]

    def record(epoch):
        curve.append({"epoch": epoch, **evaluate(student, tokenizer, eval_sets, cfg),
                      **(abstention(student, tokenizer, eval_sets, cfg) if cfg.unknown_answer else {})})
        tqdm.write(f"  {run_name(method, trainable)} epoch {epoch}: " + "  ".join(f"{k} {v:.3f}" for k, v in curve[-1].items() if k != "epoch"))

    batches = qa_batches(tokenizer, train_facts, cfg.batch_size)
    every_epoch = saves_epoch_checkpoints_here(checkpoint_dir, student, cfg, run_name(method, trainable))  # Part III, §11
    loss_fn = (make_loss or method_loss)(method, student, teacher, cfg, batches)
    with teacher_off_device(teacher, make_loss is not None or loss_runs_teacher(method, teacher, batches, cfg)):  # Part III, §8
        stats = train(student, batches, loss_fn, epochs=cfg.epochs, lr=cfg.lr, cfg=cfg, desc=run_name(method, trainable),
                      on_epoch_end=record, seed=cfg.seed, checkpoint_dir=checkpoint_dir, checkpoint_extra=lambda: {"curve": curve},
                      save_every_epoch=every_epoch)
    final = {k: v for k, v in curve[-1].items() if k != "epoch"}
    result = {"method": method, "trainable": trainable if method == "freeze" else None,
              "trainable_params": count_params(student, trainable_only=True), "teacher": teacher_scores, "final": final,
              "forgetting": relative_drop(teacher_scores["held_acc"], final["held_acc"]), "curve": curve,
              "train_tokens_per_s": stats["tokens_per_s"], "stage2_s": time.perf_counter() - started}
    if save_to is not None:  # --save_model: before result.json, so a resumed finished run has its model too
        save_hf_model(student, tokenizer, save_to)
    save_finished_result(checkpoint_dir, result)  # for --resume: it replaces the epoch checkpoint
    return result


def relative_drop(before: float, after: float) -> float | None:
    """Forgetting: the relative drop of D_held accuracy; undefined (None) when nothing was known."""
    return (before - after) / before if before > 0 else None


def excess_forgetting(result: dict, control: dict | None) -> float | None:
    """Forgetting beyond what fine-tuning on known facts alone (the known_only control) costs."""
    if control is None or result["forgetting"] is None or control["forgetting"] is None:
        return None
    return result["forgetting"] - control["forgetting"]


def run_name(method: str, trainable: str | None) -> str:
    return f"freeze-{trainable}" if method == "freeze" else method


def relabel_unknown(facts: list[dict], answer: str) -> list[dict]:
    """--unknown_answer: train the Unknown facts to abstain rather than to answer (Gekhman et al. 2024)."""
    return [{**f, "answers": [answer]} for f in facts] if answer else facts


def abstention(model, tokenizer, eval_sets: dict, cfg: Config) -> dict:
    """Fraction of questions answered with --unknown_answer: wanted on D_unknown, a cost on D_held."""
    max_new = len(tokenizer(" " + cfg.unknown_answer, add_special_tokens=False)["input_ids"]) + 2
    rates = {}
    for name in ("unknown", "held"):
        prompts = [QA_PROMPT.format(question=f["question"]) for f in eval_sets[name]]
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=cfg.eval_batch_size, desc=f"abstain {name}")
        rates[f"{name}_abstain"] = sum(is_correct(a[0], [cfg.unknown_answer]) for a in answers) / max(1, len(prompts))
    return rates


# =====================================================================================================
# 6b. Results: results.json, results.md laid out like the paper's Table 1
# =====================================================================================================
def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def table1(rows: list[dict]) -> str:
    """Markdown table in the layout of the paper's Table 1 (accuracy % on D_known / D_unknown / D_held)."""
    lines = ["| method | trainable | D_known (task) | D_unknown (new) | D_held (held-out) | forgetting | excess over known_only |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        new = None if r["method"] == "known_only" else r["final"]["unknown_acc"]
        lines.append(f"| {r['method']} | {r.get('trainable') or 'all'} | {pct(r['final']['known_acc'])} | {pct(new)} | "
                     f"{pct(r['final']['held_acc'])} | {pct(r['forgetting'])} | {pct(r.get('excess_forgetting'))} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, result: dict, cfg: Config):
    # The config of this folder's run: with --method all, its own method and trainable groups, not "all"
    write_json_atomic(out / "config.json", {**asdict(replace(cfg, method=result["method"], trainable=result["trainable"] or cfg.trainable)),
                                            "world_size": result.get("world_size", 1), "engine": result.get("engine", "none")})
    write_text_atomic(out / "results.md", f"# {run_name(result['method'], result['trainable'])} (seed {cfg.seed})\n\n"
                      f"Teacher: D_known {pct(result['teacher']['known_acc'])}, D_unknown {pct(result['teacher']['unknown_acc'])}, "
                      f"D_held {pct(result['teacher']['held_acc'])}\n\n" + table1([result])
                      + "\n" + anatomy_report([result]))  # shock, residue, drift: where the forgetting came from (Part II, §7c)
    write_json_atomic(out / "results.json", result)  # last: its presence marks a finished run


# =====================================================================================================
# main: data -> base model -> SliCK split -> stage 1 teacher -> stage 2 method(s) -> report
# =====================================================================================================
@dataclass
class Study:
    """What stage 2 starts from, prepared once: the data, the base model's SliCK split, the stage-1 teacher."""
    data_dir: Path
    facts: list[dict]
    world: dict
    tokenizer: object
    model_id: str
    pool: list[dict]  # the categorised facts
    categories: dict[str, str]  # fact id -> SliCK category
    category_counts: dict[str, int]
    splits: dict[str, list[dict]]  # known, unknown, held, val
    eval_sets: dict[str, list[dict]]  # the fixed evaluation subsets of the splits
    teacher: object
    stage1: dict
    teacher_scores: dict[str, float]
    base: object = None  # with keep_base: the experiments measure drift against the base model
    # the experiments' (run_experiments): the teacher's width, the base model's held-out entity states, its drift
    width: int = 0
    reference_states: torch.Tensor | None = None
    teacher_measure: dict | None = None


def prepare_study(cfg: Config, device: torch.device, keep_base: bool = False, checkpoint_dir: Path | None = None) -> Study:
    """data -> base model -> SliCK split -> stage 1 teacher: the path main and the experiments share."""
    data_dir = data_folder(cfg)  # --data, or the synthetic world of the preset, built on first use (Part III, §12)
    facts, world = load_facts(data_dir)

    # 2. The base model
    base, tokenizer, model_path = load_base_model(cfg, data_dir, world, device)
    model_id = str(model_path) if cfg.model else model_path.name

    # 3. SliCK categories of the base model's knowledge, then the splits. UUID-key facts are kept for the
    # hypothesis experiments; the main study's new facts have name-like keys, as in the paper.
    pool = category_pool(facts, cfg)
    categories = cached_categories(base, tokenizer, pool, cfg, model_path)  # categorize_facts, once (Part III, §12)
    category_counts = {c: sum(v == c for v in categories.values()) for c in CATEGORIES}
    print("SliCK categories of the base model: " + ", ".join(f"{c} {n}" for c, n in category_counts.items()))
    rng = random.Random(cfg.seed)
    splits = split_facts(pool, categories, cfg, rng)
    eval_sets = eval_subsets(splits, cfg, rng)
    print("splits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    # 5. Stage 1: the teacher
    seed_everything(cfg.seed)
    teacher, stage1 = learn_task_format(base, tokenizer, splits, cfg, checkpoint_dir)
    teacher_scores = evaluate(teacher, tokenizer, eval_sets, cfg)
    print("teacher (after task-format learning): " + "  ".join(f"{k} {v:.3f}" for k, v in teacher_scores.items()))
    return Study(data_dir, facts, world, tokenizer, model_id, pool, categories, category_counts, splits, eval_sets,
                 teacher, stage1, teacher_scores, base if keep_base else None)


def main(cfg: Config) -> dict:
    wall_start = time.perf_counter()
    if cfg.experiment:  # Part II: the hypothesis experiments, their own conditions from the same teacher path
        return run_experiments(cfg)
    if cfg.audit or cfg.screen:  # the practitioners' tools (Part III, §14)
        return run_audit(cfg) if cfg.audit else run_screen(cfg)
    folders = output_folders(cfg)
    checkpoints = run_root(cfg) / "checkpoints"
    check_output(cfg, folders, checkpoints)  # before any work, so earlier results are never lost (Part III, §11)
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)  # a precision the device cannot run stops here, before any work

    study = prepare_study(cfg, device, checkpoint_dir=checkpoints)
    tokenizer, splits, eval_sets, teacher, teacher_scores = study.tokenizer, study.splits, study.eval_sets, study.teacher, study.teacher_scores

    # 6. Stage 2, one method or all of them from the same teacher
    runs = ALL_RUNS if cfg.method == "all" else ((cfg.method, cfg.trainable if cfg.method == "freeze" else None),)
    common = {"seed": cfg.seed, "preset": cfg.preset, "model": cfg.model or f"synthetic base ({study.model_id})",
              "splits": {k: len(splits[k]) for k in ("known", "unknown", "held", "val")}, "categories": study.category_counts,
              "slick_vs_truth": slick_vs_truth(study.pool, study.categories), "stage1": study.stage1,
              "held_eval_ids": [f["id"] for f in eval_sets["held"]],  # the facts behind held_acc, for --audit_facts
              **spread(teacher, cfg)}  # world_size and engine (none | ddp | fsdp) of torchrun (Part III, §16)
    if cfg.save_model:  # the reference of forgetting, which an audit of the saved models compares against
        save_hf_model(teacher, tokenizer, run_root(cfg) / "teacher")
    train_facts = splits["known"] + relabel_unknown(splits["unknown"], cfg.unknown_answer)
    batches = qa_batches(tokenizer, train_facts, cfg.batch_size)
    check_memory_plan(memory_plan(teacher, batches, ALL_RUNS if cfg.sweep else runs, cfg, device))  # Part III, §10
    if cfg.sweep:  # the frontier: each swept value and the controls, all from this one teacher (Part III, §13)
        report = run_sweep(teacher, tokenizer, splits, eval_sets, teacher_scores, common, cfg, folders, checkpoints)
        drop_checkpoints(checkpoints, cfg)
        return report
    results = []
    for method, trainable in runs:
        result = {**run_method(method, trainable, teacher, tokenizer, splits, eval_sets, teacher_scores, cfg,
                               checkpoint_dir=checkpoints / run_name(method, trainable),
                               save_to=folders[run_name(method, trainable)] / "model" if cfg.save_model else None), **common}
        results.append(result)
    control = next((r for r in results if r["method"] == "known_only"), None)
    for result in results:
        result["excess_forgetting"] = excess_forgetting(result, control)
        result["wall_s"] = time.perf_counter() - wall_start
        write_results(folders[run_name(result["method"], result["trainable"])], result, cfg)

    # 6b. Results: the table laid out like the paper's Table 1
    table = table1(results)
    print("\n" + table)
    if cfg.method == "all":
        root = run_root(cfg)
        write_text_atomic(root / "summary.md", f"# sftguard --method all, preset {cfg.preset}, seed {cfg.seed}\n\n"
                          f"Teacher: D_known {pct(teacher_scores['known_acc'])}, D_unknown {pct(teacher_scores['unknown_acc'])}, "
                          f"D_held {pct(teacher_scores['held_acc'])}\n\nAccuracy % after stage 2 ({cfg.epochs} epochs); forgetting is "
                          f"the relative drop of D_held accuracy from the teacher.\n\n" + table
                          + "\n" + anatomy_report(results, root, f"Where the forgetting comes from, seed {cfg.seed}"))  # Part II, §7c
    drop_checkpoints(checkpoints, cfg)
    print(f"results in {', '.join(str(f) for f in folders.values())}  ({time.perf_counter() - wall_start:.0f} s)")
    return {"results": results, "teacher": teacher_scores}


# #####################################################################################################
# PART II. WHY SFT FORGETS: the paper's hypothesis experiments (capacity, behaviour cloning, localized interference).
#   Each condition is stage 2 from the Part I teacher; representation drift and the gradient-matched L2 control.
# #####################################################################################################


# =====================================================================================================
# 7. Why SFT forgets: new facts keyed by name-like or UUID entities, drift, the L2 control, the three experiments
# =====================================================================================================
# New facts on one relation, keyed by fresh entities of two kinds: name-like keys that recombine the
# sub-word pieces of known names, and UUID keys (digit codes) that share no token with them. Each
# condition is stage 2 from the same teacher on D_known + those new facts; it is scored by forgetting
# on D_held, accuracy on the new facts, and drift of the held-out entities' hidden states.
EXPERIMENTS = ("interference", "capacity", "cloning")


KEY_TYPES = ("name", "uuid")


def experiment_plan(cfg: Config) -> tuple[list[str], list[int], list[int]]:
    """(experiments, counts, widths) of --experiment, checked before any work."""
    names = list(EXPERIMENTS) if cfg.experiment == "all" else [cfg.experiment]
    if cfg.experiment not in EXPERIMENTS + ("all",):
        raise UserError(f"unknown --experiment {cfg.experiment!r}; choose one of {', '.join(EXPERIMENTS + ('all',))}")
    try:
        counts = sorted({int(c) for c in cfg.exp_counts.split(",") if c.strip()})
        # default: 3/4 of n_embd (a half-width model on the default world knows too few facts for D_held)
        widths = sorted(({int(w) for w in cfg.exp_widths.split(",") if w.strip()} or {3 * cfg.n_embd // 4 // cfg.n_head * cfg.n_head}) | {cfg.n_embd})
    except ValueError:
        raise UserError("--exp_counts and --exp_widths take comma-separated whole numbers, e.g. --exp_counts 100,300,1000") from None
    if not counts or counts[0] < 1:
        raise UserError(f"--exp_counts {cfg.exp_counts!r}: give at least one count >= 1, e.g. 100,300,1000")
    if any(w < cfg.n_head or w % cfg.n_head for w in widths):
        raise UserError(f"--exp_widths {cfg.exp_widths or '3/4 n_embd'}: every width must be a multiple of --n_head {cfg.n_head}")
    if cfg.exp_fit_epochs < 0:
        raise UserError("--exp_fit_epochs must be >= 0 (0 = 3 x --epochs)")
    return names, counts, widths


def new_entity_facts(facts: list[dict], corpus: str, key: str, n: int, relation: str, seed: int) -> list[dict]:
    """n synthetic new facts on one relation, keyed by fresh entities (data_prep's generators):

    key="name": First Last names recombining the syllables that known names use, so they share
    sub-word pieces with known entities (like the paper's "Bergadena"); key="uuid": digit codes such as
    4821-0937-55, which share none. Keys never repeat the world's entities or each other; a name is
    never a prefix of a known name and a code never occurs in the pretraining corpus. Answers come from
    the relation's value pool and are the same for fact i of either key type (the value side is held
    fixed). Deterministic in seed; the first m facts of n are the facts of a run with m."""
    rel_facts = [f for f in facts if f["relation"] == relation]
    if not rel_facts:
        raise UserError(f"--exp_relation {relation!r} has no facts in this world; choose one of {', '.join(sorted({f['relation'] for f in facts}))}")
    template = rel_facts[0]["question"].replace(rel_facts[0]["subject"], "[X]")
    pool = sorted({f["answers"][0] for f in rel_facts})
    taken = {f["subject"] for f in facts}
    known = sorted({f["subject"] for f in facts if f.get("key") == "name" and f.get("in_pretraining")})
    rng = random.Random(f"{seed}:exp:{key}")
    keys, tries = [], 0
    if key == "name":
        syllables = [s for s in data_prep.SYLLABLES if any(s in k.lower() for k in known)] or data_prep.SYLLABLES
        prefixes = {k[:i] for k in known for i in range(1, len(k) + 1)}
        blocked = {v.lower() for r in data_prep.RELATIONS.values() for v in r["values"]}
    else:
        in_corpus = set(re.findall(r"\d{4}-\d{4}-\d{2}", corpus))
    while len(keys) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise UserError(f"could not draw {n} distinct new {key} keys; lower --exp_counts")
        if key == "name":
            first, last = data_prep.name_word(rng, syllables, 2), data_prep.name_word(rng, syllables, rng.choice([2, 3]))
            candidate = f"{first} {last}"
            if first.lower() in blocked or last.lower() in blocked or candidate in prefixes:
                continue
        else:
            candidate = data_prep.uuid_code(rng)
            if candidate in in_corpus:
                continue
        if candidate not in taken:
            taken.add(candidate)
            keys.append(candidate)
    values = random.Random(f"{seed}:exp:values")
    return [{"id": f"exp-{key}-{i:06d}", "relation": relation, "subject": s, "question": template.replace("[X]", s),
             "answers": [values.choice(pool)], "key": key, "in_pretraining": False} for i, s in enumerate(keys)]


def key_token_overlap(tokenizer, keys: list[str], known_names: list[str]) -> float:
    """Fraction of keys that share at least one token id with a known name (names tokenized as they
    occur in text: after a space, and at the start of a document)."""
    ids = lambda text: set(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    known_ids = set().union(*(ids(" " + k) | ids(k) for k in known_names))
    return sum(bool(ids(" " + k) & known_ids) for k in keys) / max(1, len(keys))


# --- Representation drift ----------------------------------------------------------------------------
def drift_layer(model) -> int:
    """The middle block (the paper: layer 14 of 28): hidden_states[n_layer // 2] is that block's output."""
    return model.config.num_hidden_layers // 2


@torch.no_grad()
def entity_states(model, tokenizer, facts: list[dict], layer: int, batch_size: int = 256) -> torch.Tensor:
    """The residual stream after block `layer` at the last token of the entity name in each fact's QA
    prompt. The prompt is cut right after the name: a causal model's state there ignores what follows."""
    model.eval()
    device = next(model.parameters()).device
    prefixes = []
    for f in facts:
        prompt = QA_PROMPT.format(question=f["question"])
        prefixes.append(prompt[: prompt.index(f["subject"]) + len(f["subject"])])
    states = []
    for start in range(0, len(prefixes), batch_size):
        encoded = [tokenizer(p)["input_ids"] for p in prefixes[start:start + batch_size]]
        width = max(map(len, encoded))  # right padding: position ids stay 0..len-1
        ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        last = torch.tensor([len(e) - 1 for e in encoded], device=device)
        states.append(hidden[torch.arange(len(encoded), device=device), last].double().cpu())
    return torch.cat(states)


def representation_drift(reference: torch.Tensor, states: torch.Tensor) -> float:
    """Mean over entities of 1 - cos(h_reference, h). Written as |u - v|^2 / 2 of the unit vectors (the
    same number), so an unchanged model drifts exactly 0."""
    u, v = F.normalize(reference, dim=-1), F.normalize(states, dim=-1)
    return float(((u - v) ** 2).sum(-1).mean() / 2)


# --- The gradient-matched L2 control -------------------------------------------------------------------
def kl_gradient_probe(student, teacher, cfg: Config, log: dict, every: int = 4):
    """The self-distillation loss (live teacher), which also records, every `every` steps, the norm of the
    KL term's gradient, |grad(lambda tau^2 KL)|, and the distance |theta - theta_teacher|: the probe the
    L2 weight is matched on (every step would double the cost of a step for little change in the mean)."""
    params = trainable_parameters(student)
    anchor = [p.detach().clone() for p in params]
    steps = [0]

    def loss_fn(logits, targets, batch):
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        answer = batch["labels"][:, 1:] != -100
        loss, kl = self_distillation_loss(logits, teacher_logits[answer], targets, cfg.kl_weight, cfg.temperature)
        steps[0] += 1
        if (steps[0] - 1) % every:
            return loss
        grads = torch.autograd.grad(cfg.kl_weight * cfg.temperature**2 * kl, params, retain_graph=True, allow_unused=True)
        log.setdefault("step", []).append(steps[0] - 1)  # which epoch it belongs to: the weight matched on epoch 1 alone
        log["kl_grad_norm"].append(math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None)))
        log["distance"].append(math.sqrt(sum(float(((p.detach() - a).double() ** 2).sum()) for p, a in zip(params, anchor))))
        return loss
    return loss_fn


def matched_l2_weight(kl_grad_norms: list[float], distances: list[float]) -> float:
    """alpha such that the L2 term's gradient 2 alpha (theta - theta_teacher) has, summed over the probe's
    steps, the same norm as the self-distillation KL term's gradient: alpha = sum|g_KL| / (2 sum|theta - theta_0|)."""
    if sum(distances) <= 0:
        raise ValueError("the probe never moved the weights; the L2 weight cannot be matched")
    return sum(kl_grad_norms) / (2 * sum(distances))


def matched_l2_weights(probe: dict, steps_per_epoch: int) -> dict:
    """The probe's matched alpha over the whole run and over epoch 1 alone (where the shock happens)."""
    first = [i for i, step in enumerate(probe["step"]) if step < steps_per_epoch]
    return {"l2_weight": matched_l2_weight(probe["kl_grad_norm"], probe["distance"]),
            "l2_weight_epoch1": matched_l2_weight([probe["kl_grad_norm"][i] for i in first], [probe["distance"][i] for i in first]),
            "steps": len(probe["distance"]), "steps_epoch1": len(first)}


# --- One condition: stage 2 from the teacher on D_known + new facts ---------------------------------------
def run_condition(study: "Study", new_facts: list[dict], method: str, cfg: Config, *, epochs: int,
                  fit_target: float | None = None, l2_weight: float | None = None, probe: dict | None = None) -> dict:
    """Train a fresh copy of the teacher (method: sft | selfdistill | l2 | known_only) and record after
    every epoch: held-out accuracy, new-fact accuracy and drift. fit_target stops training at the first
    epoch whose new-fact accuracy reaches it (the cloning experiment's fitted UUID facts)."""
    started = time.perf_counter()
    teacher, tokenizer, held = study.teacher, study.tokenizer, study.eval_sets["held"]
    new_eval = new_facts[: cfg.eval_max]
    layer = drift_layer(teacher)

    same = [f for f in held if f["relation"] == cfg.exp_relation]  # held-out facts asked with the new facts' question
    other = [f for f in held if f["relation"] != cfg.exp_relation]

    def measure(model):
        same_acc, other_acc = (accuracy(model, tokenizer, part, cfg, desc="eval held") if part else float("nan") for part in (same, other))
        return {"held_acc": (len(same) * nan_to_0(same_acc) + len(other) * nan_to_0(other_acc)) / len(held),
                "held_same_relation_acc": same_acc, "held_other_relations_acc": other_acc,
                "new_acc": accuracy(model, tokenizer, new_eval, cfg, desc="eval new") if new_eval else float("nan"),
                "drift": representation_drift(study.reference_states, entity_states(model, tokenizer, held, layer))}

    seed_everything(cfg.seed)
    student = copy.deepcopy(teacher)
    set_trainable(student, "all")
    curve = [{"epoch": 0, **measure(teacher)}]

    def record(epoch):
        curve.append({"epoch": epoch, **measure(student)})
        return fit_target is not None and curve[-1]["new_acc"] >= fit_target

    batches = qa_batches(tokenizer, study.splits["known"] + new_facts, cfg.batch_size)
    if probe is not None:
        loss_fn = kl_gradient_probe(student, teacher, cfg, probe)
    else:
        loss_fn = method_loss(method, student, teacher, replace(cfg, l2_weight=cfg.l2_weight if l2_weight is None else l2_weight), batches)
    key = new_facts[0]["key"] if new_facts else "none"
    with teacher_off_device(teacher, probe is not None or loss_runs_teacher(method, teacher, batches, cfg)):
        train(student, batches, loss_fn, epochs=epochs, lr=cfg.lr, cfg=cfg, desc=f"{method} {key} x{len(new_facts)} w{study.width}", on_epoch_end=record, seed=cfg.seed)
    final = curve[-1]
    tqdm.write(f"  {method:<11} {key:<4} n={len(new_facts):<5} width={study.width:<4} epochs={final['epoch']}: "
               f"new {final['new_acc']:.3f}  held {final['held_acc']:.3f}  drift {final['drift']:.4f}")
    return {"key": key, "count": len(new_facts), "width": study.width, "method": method, "epochs": final["epoch"],
            "forgetting": relative_drop(curve[0]["held_acc"], final["held_acc"]), "new_acc": final["new_acc"],
            "held_acc": final["held_acc"], "drift": final["drift"], "teacher_held_acc": curve[0]["held_acc"],
            "forgetting_same_relation": relative_drop(curve[0]["held_same_relation_acc"], final["held_same_relation_acc"]),
            "forgetting_other_relations": relative_drop(curve[0]["held_other_relations_acc"], final["held_other_relations_acc"]),
            "l2_weight": l2_weight, "fit_target": fit_target, "seconds": time.perf_counter() - started, "curve": curve}


def nan_to_0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def epoch_reaching(curve: list[dict], target: float) -> str:
    """The first epoch whose new-fact accuracy reached target, or '–'."""
    return next((str(p["epoch"]) for p in curve if p["new_acc"] >= target), "–")


def forgetting_at_new_acc(row: dict, target: float) -> float:
    """Forgetting when the run's new-fact accuracy first reached target, interpolated linearly between
    epochs (the fair comparison when one key type is fitted more slowly); nan if never reached, or if the teacher
    already knew as much (training was not needed to get there: there is nothing to compare)."""
    return curve_forgetting_at(row["curve"], target, "new_acc", row["teacher_held_acc"])


def curve_forgetting_at(curve: list[dict], target: float, new_key: str, base: float | None = None) -> float:
    """Forgetting (against base, default the curve's epoch 0) where the curve's new_key accuracy first reached target,
    interpolated linearly between epochs; nan if never reached or reached before training (at epoch 0)."""
    base = curve[0]["held_acc"] if base is None else base
    if curve[0][new_key] >= target:  # the teacher already had it: every run "forgets 0" there, which compares nothing
        return float("nan")
    for before, after in zip(curve, curve[1:]):
        if after[new_key] >= target:
            span = after[new_key] - before[new_key]
            t = 1.0 if span <= 0 else max(0.0, (target - before[new_key]) / span)
            return relative_drop(base, before["held_acc"] + t * (after["held_acc"] - before["held_acc"]))
    return float("nan")


# --- The three experiments ------------------------------------------------------------------------------
def experiment_interference(run, counts, widths, cfg) -> list[dict]:
    """Name-like vs UUID keys at each count, under SFT and self-distillation, plus the known_only and
    gradient-matched L2 controls at the largest count, and there UUID-key SFT trained on until it has learned as
    much as name-key SFT (capped at 95%; at most exp_fit_epochs): UUID facts are learned more slowly, and the two
    keys are compared where both have learned as much."""
    w, top = cfg.n_embd, counts[-1]
    rows = [run(w, "name", top, "selfdistill", probe=True)]  # first: it measures the L2 weight
    rows += [run(w, key, n, method) for n in counts for key in KEY_TYPES for method in ("sft", "selfdistill")
             if (key, n, method) != ("name", top, "selfdistill")]
    rows += [run(w, None, 0, "known_only"), run(w, "name", top, "l2")]
    return rows + [fitted_uuid_run(run, w, top, find_row(rows, key="name", count=top, method="sft"), cfg)]


def fitted_uuid_run(run, width: int, n: int, name_row: dict, cfg) -> dict:
    """UUID-key SFT on n facts trained until its new-fact accuracy reaches name-key SFT's (capped at 95%: "fitted"),
    checked each epoch, at most exp_fit_epochs (default 3 x epochs)."""
    return run(width, "uuid", n, "sft", fit_target=min(name_row["new_acc"], 0.95), epochs=cfg.exp_fit_epochs or 3 * cfg.epochs)


def experiment_capacity(run, counts, widths, cfg) -> list[dict]:
    """SFT forgetting against the count of new facts and the model width, for both key types."""
    return [run(w, key, n, "sft") for w in widths for key in KEY_TYPES for n in counts] + [run(w, None, 0, "known_only") for w in widths]


def experiment_cloning(run, counts, widths, cfg) -> list[dict]:
    """At the middle count: name-key facts (SFT, --epochs), UUID-key facts trained until fitted to the
    same new-fact accuracy, capped at 95% (at most exp_fit_epochs), UUID facts at the same epoch, known_only."""
    w, n = cfg.n_embd, counts[len(counts) // 2]
    name = run(w, "name", n, "sft")  # its accuracy on the new facts (at most 95%: "fitted") is the level to reach
    fitted = fitted_uuid_run(run, w, n, name, cfg)
    return [run(w, None, 0, "known_only"), name, run(w, "uuid", n, "sft"), fitted]


CONDITION_NAMES = {"known_only": "known_only (no new facts)", "sft": "SFT", "selfdistill": "self-distillation", "l2": "gradient-matched L2"}


def condition_name(row: dict) -> str:
    if row["method"] == "known_only":
        return CONDITION_NAMES["known_only"]
    fitted = ", fitted" if row.get("fit_target") is not None else ""
    return f"{CONDITION_NAMES[row['method']]}, {row['key']} keys{fitted}"


def experiment_study(cfg: Config, width: int, device: torch.device) -> "Study":
    """The Part I study (base model, split, teacher) at this hidden width, with the base model's states of the
    held-out entities (the reference of drift) and the teacher's own drift."""
    print(f"--- base model and teacher of width {width}")
    study = prepare_study(replace(cfg, n_embd=width), device, keep_base=True)
    if study.world.get("source") != "synthetic":
        raise UserError("--experiment needs the synthetic world (its name-like and UUID keys); drop --data or point it at a data_prep.py world")
    study.width = study.teacher.config.hidden_size
    layer = drift_layer(study.teacher)
    study.reference_states = entity_states(study.base, study.tokenizer, study.eval_sets["held"], layer)
    study.base = None  # only its states are needed
    study.teacher_measure = {"held_acc": study.teacher_scores["held_acc"], "drift": representation_drift(
        study.reference_states, entity_states(study.teacher, study.tokenizer, study.eval_sets["held"], layer))}
    return study


def experiment_result(name: str, rows: list[dict], cfg: Config, counts, widths, studies: dict, new_facts: dict,
                      probe: dict | None) -> dict:
    """DIR/<name>.json: the conditions' rows, the setting, the teachers, the key types' token overlap, the L2 probe."""
    study = studies[cfg.n_embd]
    known = sorted({f["subject"] for f in study.facts if f.get("key") == "name" and f.get("in_pretraining")})
    return {
        "experiment": name, "seed": cfg.seed, "preset": cfg.preset, "counts": counts, "widths": widths, "epochs": cfg.epochs,
        "relation": cfg.exp_relation, "drift": f"mean 1 - cos of hidden_states[{drift_layer(study.teacher)}] at the entity's "
        "last token, held-out facts, against the base model before stage 1",
        "key_token_overlap": {k: key_token_overlap(study.tokenizer, [f["subject"] for f in new_facts[k]], known) for k in KEY_TYPES},
        "teacher": {str(w): {**s.teacher_scores, "drift": s.teacher_measure["drift"], "stage1": s.stage1} for w, s in studies.items()},
        "l2_probe": ({**matched_l2_weights(probe, math.ceil((len(study.splits["known"]) + counts[-1]) / cfg.batch_size)),
                      "mean_kl_grad_norm": sum(probe["kl_grad_norm"]) / len(probe["kl_grad_norm"])} if probe is not None else None),
        "rows": rows}


def run_experiments(cfg: Config) -> dict:
    """--experiment: prepare the teacher of every width once, run each condition once (conditions shared
    by several experiments are reused), write DIR/<experiment>.json, experiments.md and the plots."""
    wall_start = time.perf_counter()
    names, counts, widths = experiment_plan(cfg)
    root = Path(cfg.out or default_out(cfg))
    for name in names:  # refuse before any work, so earlier results are never lost
        if (root / f"{name}.json").exists() and not cfg.overwrite:
            raise UserError(f"{root / name}.json already exists; pass --overwrite or choose another --out")
    device = resolve_device(cfg.device)
    resolve_precision(cfg.precision, device)
    if cfg.model or "capacity" not in names:  # a local model comes in one width
        widths = [cfg.n_embd]
    studies, new_facts, done = {}, {}, {}
    probe_log = {"kl_grad_norm": [], "distance": [], "step": []}  # filled by the first condition (interference runs it first)

    def study_of(width):
        if width not in studies:
            studies[width] = experiment_study(cfg, width, device)
            if not new_facts:
                corpus = (studies[width].data_dir / "pretrain.jsonl").read_text()
                for key in KEY_TYPES:
                    new_facts[key] = new_entity_facts(studies[width].facts, corpus, key, counts[-1], cfg.exp_relation, cfg.seed)
        return studies[width]

    def run(width, key, n, method, *, epochs=None, fit_target=None, probe=False):
        epochs = epochs or cfg.epochs
        memo = (width, key, n, method, epochs, fit_target)
        if memo not in done:
            study = study_of(width)
            facts = new_facts[key][:n] if key else []
            l2 = matched_l2_weight(probe_log["kl_grad_norm"], probe_log["distance"]) if method == "l2" else None
            done[memo] = run_condition(study, facts, method, cfg, epochs=epochs, fit_target=fit_target, l2_weight=l2,
                                       probe=probe_log if probe else None)
        return done[memo]

    experiments = {"interference": experiment_interference, "capacity": experiment_capacity, "cloning": experiment_cloning}
    results = {}
    for name in names:
        print(f"=== experiment {name}")
        rows = [{"condition": condition_name(r), **r} for r in experiments[name](run, counts, widths, cfg)]
        results[name] = experiment_result(name, rows, cfg, counts, widths, studies, new_facts,
                                          probe_log if name == "interference" else None)
        write_json_atomic(root / f"{name}.json", results[name])
    plots = write_experiment_plots(root, results)
    report = experiments_markdown(results, plots, cfg, time.perf_counter() - wall_start)
    write_text_atomic(root / "experiments.md", report)
    print("\n" + report)
    print(f"experiment results in {root}  ({time.perf_counter() - wall_start:.0f} s)")
    return results


# =====================================================================================================
# 7b. The experiments' report: tables that read like the paper's, the checks, the plots
# =====================================================================================================
# --- The experiments' report: tables that read like the paper's, the checks, the plots ------------------------
def pct2(x) -> str:
    """Drift is small in a small model: two decimals."""
    return "–" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def find_row(rows: list[dict], fitted: bool = False, **match) -> dict | None:
    """The first row matching every field; a fitted row (trained on to a new-fact accuracy) only when fitted=True."""
    return next((r for r in rows if (r.get("fit_target") is not None) == fitted and all(r.get(k) == v for k, v in match.items())), None)


def equal_acquisition_pair(rows: list[dict], n: int) -> tuple[dict, dict, float]:
    """(name-key SFT, UUID-key SFT, the new-fact accuracy both reached) at n new facts: the UUID run fitted to the name
    keys' accuracy where there is one (the largest count), else the plain one; the level is the lower final accuracy."""
    name = find_row(rows, key="name", count=n, method="sft")
    uuid = find_row(rows, fitted=True, key="uuid", count=n, method="sft") or find_row(rows, key="uuid", count=n, method="sft")
    return name, uuid, min(name["new_acc"], uuid["new_acc"])


@dataclass
class InterferenceNumbers:
    """What the interference checks read, from one seed's rows. Over seeds, `mean` averages them number by number,
    so each seed's equal-acquisition figures come from its own curve (fitted runs stop at different epochs)."""
    sft: dict[str, list[float]]       # key type -> SFT forgetting at each count
    matched: dict[str, list[float]]   # key type -> SFT forgetting where both keys first reached `levels` (per count)
    levels: list[float]               # the new-fact accuracy each count's pair is compared at
    drift: dict[str, float]           # "name sft", "uuid sft", "name selfdistill" -> drift at the largest count
    sd: float                         # name-key self-distillation forgetting at the largest count
    l2: float                         # gradient-matched L2 forgetting there
    sd_new: float                     # their new-fact accuracies
    l2_new: float
    level: float                      # the lower of the two: where sd_at and l2_at are read
    teacher_new: float                # the teacher's accuracy on those new facts: a level at or below it compares nothing
    sd_at: float
    l2_at: float

    @classmethod
    def of(cls, rows: list[dict], counts: list[int]) -> "InterferenceNumbers":
        top = counts[-1]
        sd, l2 = find_row(rows, key="name", count=top, method="selfdistill"), find_row(rows, key="name", count=top, method="l2")
        level = min(sd["new_acc"], l2["new_acc"])
        pairs = [equal_acquisition_pair(rows, n) for n in counts]
        return cls(sft={k: [find_row(rows, key=k, count=n, method="sft")["forgetting"] for n in counts] for k in KEY_TYPES},
                   matched={"name": [forgetting_at_new_acc(name, t) for name, _, t in pairs],
                            "uuid": [forgetting_at_new_acc(uuid, t) for _, uuid, t in pairs]},
                   levels=[t for _, _, t in pairs],
                   drift={f"{k} {m}": find_row(rows, key=k, count=top, method=m)["drift"]
                          for k, m in (("name", "sft"), ("uuid", "sft"), ("name", "selfdistill"))},
                   sd=sd["forgetting"], l2=l2["forgetting"], sd_new=sd["new_acc"], l2_new=l2["new_acc"], level=level,
                   teacher_new=l2["curve"][0]["new_acc"],
                   sd_at=forgetting_at_new_acc(sd, level), l2_at=forgetting_at_new_acc(l2, level))

    @classmethod
    def mean(cls, per_seed: list["InterferenceNumbers"]) -> "InterferenceNumbers":
        def avg(values):
            first = values[0]
            if isinstance(first, dict):
                return {k: avg([v[k] for v in values]) for k in first}
            if isinstance(first, list):
                return [statistics.mean(xs) for xs in zip(*values)]
            return statistics.mean(values)
        return cls(**{k: avg([vars(x)[k] for x in per_seed]) for k in vars(per_seed[0])})


def interference_checks(x: InterferenceNumbers) -> list[tuple[str, bool, str]]:
    """The paper's findings as (claim, holds, measured numbers); forgetting against the teacher."""
    nums = lambda xs: ", ".join(pct(v) for v in xs)  # noqa: E731
    levels = ", ".join(pct(t) for t in x.levels)
    several = len(x.sft["name"]) > 1  # a trend over the counts needs two of them; one count would tick both trivially
    one_count = "not measured: one count; give --exp_counts two or more, e.g. 100,300,1000"
    return [
        ("UUID-key forgetting <= 1/4 of name-key forgetting at every count (SFT)",
         all(u <= n / 4 for u, n in zip(x.sft["uuid"], x.sft["name"])), f"UUID {nums(x.sft['uuid'])} vs name {nums(x.sft['name'])}"),
        ("the same at equal new-fact accuracy", all(u <= n / 4 for u, n in zip(x.matched["uuid"], x.matched["name"])),
         f"UUID {nums(x.matched['uuid'])} vs name {nums(x.matched['name'])} (at {levels}% new facts)"),
        ("UUID-key forgetting flat within 5 points over the counts",
         several and max(x.sft["uuid"]) - min(x.sft["uuid"]) <= 0.05,
         f"range {pct(max(x.sft['uuid']) - min(x.sft['uuid']))} points" if several else one_count),
        ("name-key forgetting grows with the count", several and all(a < b for a, b in zip(x.sft["name"], x.sft["name"][1:])),
         nums(x.sft["name"]) if several else one_count),
        ("drift of name-key SFT above UUID-key SFT and name-key self-distillation",
         x.drift["name sft"] > max(x.drift["uuid sft"], x.drift["name selfdistill"]),
         f"{pct2(x.drift['name sft'])} vs {pct2(x.drift['uuid sft'])} and {pct2(x.drift['name selfdistill'])}"),
        ("gradient-matched L2 forgetting >= 2x self-distillation's", x.l2 >= 2 * x.sd,
         f"{pct(x.l2)} vs {pct(x.sd)} (new-fact accuracy {pct(x.l2_new)} vs {pct(x.sd_new)})"),
        ("the same at equal new-fact accuracy", x.level > x.teacher_new and x.l2_at >= 2 * x.sd_at,
         f"{pct(x.l2_at)} vs {pct(x.sd_at)} at {pct(x.level)}" if x.level > x.teacher_new else
         f"not comparable: L2 learned no more of the new facts ({pct(x.level)}) than the teacher knew ({pct(x.teacher_new)})"),
    ]


def interference_markdown(result: dict) -> str:
    rows, counts = result["rows"], result["counts"]
    top = counts[-1]
    lines = [f"## Localized interference: name-like vs UUID keys (width {result['rows'][0]['width']})\n",
             f"New facts on `{result['relation']}`; keys sharing a token with a known name: name-like "
             f"{pct(result['key_token_overlap']['name'])}%, UUID {pct(result['key_token_overlap']['uuid'])}%.\n",
             "| new facts | key | method | new-fact acc | D_held acc | forgetting | excess over known_only | drift |",
             "|---|---|---|---|---|---|---|---|"]
    control = find_row(rows, method="known_only")
    for r in sorted((r for r in rows if r["method"] in ("sft", "selfdistill")), key=lambda r: (r["count"], r["key"], r["method"] != "sft")):
        lines.append(f"| {r['count']} | {r['key']} | {CONDITION_NAMES[r['method']]} | {pct(r['new_acc'])} | {pct(r['held_acc'])} | "
                     f"{pct(r['forgetting'])} | {pct(r['forgetting'] - control['forgetting'])} | {pct2(r['drift'])} |")
    lines += ["", f"Forgetting by the relation of the held-out fact (SFT): asked with the new facts' question (`{result['relation']}`) "
              "or with another relation's:\n", "| new facts | key | same relation | other relations |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r["method"] == "sft"), key=lambda r: (r["count"], r["key"])):
        lines.append(f"| {r['count']} | {r['key']} | {pct(r['forgetting_same_relation'])} | {pct(r['forgetting_other_relations'])} |")
    lines += ["", "At equal new-fact accuracy (SFT; the lower of the two keys' final accuracies, forgetting interpolated "
              "between epochs where that accuracy was first reached; at the largest count the UUID run trained on until it "
              "learned as much as the name keys):\n",
              "| new facts | new-fact acc | forgetting, name keys (epoch) | forgetting, UUID keys (epoch) |", "|---|---|---|---|"]
    for n in counts:
        name, uuid, target = equal_acquisition_pair(rows, n)
        at = lambda r: f"{pct(forgetting_at_new_acc(r, target))} ({epoch_reaching(r['curve'], target)})"  # noqa: E731
        lines.append(f"| {n} | {pct(target)} | {at(name)} | {at(uuid)} |")
    probe = result["l2_probe"]
    lines += ["", f"Controls at {top} name-key facts (L2 weight {probe['l2_weight']:.3g}, matched to the self-distillation "
              f"KL gradient over {probe['steps']} probe steps"
              + (f"; over epoch 1 alone it would be {probe['l2_weight_epoch1']:.3g}" if "l2_weight_epoch1" in probe else "")
              + "); the last column compares them where each first reached the "
              "lowest of their final new-fact accuracies:\n",
              "| method | new-fact acc | D_held acc | forgetting | drift | forgetting at equal new-fact acc |", "|---|---|---|---|---|---|"]
    controls = [find_row(rows, key="name", count=top, method=m) for m in ("sft", "selfdistill", "l2")]
    target = min(r["new_acc"] for r in controls)
    for r in controls + [find_row(rows, method="known_only")]:
        if r["method"] == "known_only":
            at = "–"
        elif r["curve"][0]["new_acc"] >= target:
            at = f"not comparable: the teacher already had {pct(target)}"
        else:
            at = f"{pct(forgetting_at_new_acc(r, target))} ({pct(target)})"
        lines.append(f"| {condition_name(r)} | {pct(r['new_acc'])} | {pct(r['held_acc'])} | {pct(r['forgetting'])} | {pct2(r['drift'])} | {at} |")
    epochs = max(len(r["curve"]) for r in rows) - 1
    lines += ["", f"Drift % over training at {top} new facts (0 for the base model; 'stage 1' is the teacher):\n",
              "| condition | stage 1 | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " |", "|---|---|" + "---|" * epochs]
    for r in [find_row(rows, key=k, count=top, method=m) for m in ("sft", "selfdistill") for k in KEY_TYPES] + [find_row(rows, method="known_only")]:
        lines.append(f"| {condition_name(r)} | " + " | ".join(pct2(p["drift"]) for p in r["curve"]) + " |")
    lines += ["", anatomy_markdown("condition | new facts | held-out facts", interference_anatomy_rows([rows], result["relation"]))]
    lines += ["The paper's findings, checked (at an equal epoch unless stated):\n"]
    lines += [f"- [{'x' if ok else ' '}] {claim}: {numbers}" for claim, ok, numbers in interference_checks(InterferenceNumbers.of(rows, counts))]
    return "\n".join(lines) + "\n"


def capacity_markdown(result: dict) -> str:
    rows, counts = result["rows"], result["counts"]
    lines = ["## Capacity: forgetting against the number of new facts and the model width (SFT)\n",
             "Forgetting % (new-fact accuracy %) after the same number of epochs.\n",
             "| key | width | " + " | ".join(f"{n} facts" for n in counts) + " | known_only |", "|---|---|" + "---|" * (len(counts) + 1)]
    for key in KEY_TYPES:
        for w in result["widths"]:
            cells = [find_row(rows, key=key, count=n, width=w, method="sft") for n in counts]
            control = find_row(rows, method="known_only", width=w)
            lines.append(f"| {key} | {w} | " + " | ".join(f"{pct(r['forgetting'])} ({pct(r['new_acc'])})" for r in cells)
                         + f" | {pct(control['forgetting'])} |")
    return "\n".join(lines) + "\n"


def cloning_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [f"## Behaviour cloning: fitting unknown facts that overlap known ones or not ({rows[1]['count']} new facts)\n",
             "| condition | epochs | new-fact acc | D_held acc | forgetting | drift |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['condition']} | {r['epochs']} | {pct(r['new_acc'])} | {pct(r['held_acc'])} | {pct(r['forgetting'])} | {pct2(r['drift'])} |")
    control, name, fitted = rows[0], rows[1], rows[3]
    reached = fitted["new_acc"] >= name["new_acc"]
    lines += ["", f"Excess forgetting over known_only: name keys {pct(name['forgetting'] - control['forgetting'])} points, "
              f"fitted UUID keys {pct(fitted['forgetting'] - control['forgetting'])} points"
              + ("" if reached else f" (the UUID facts did not reach {pct(name['new_acc'])}% in {fitted['epochs']} epochs)") + "."]
    return "\n".join(lines) + "\n"


def pyplot():
    """matplotlib.pyplot drawing to files (Agg); None where an older install lacks matplotlib (then no PNG), and on
    ranks > 0 under torchrun (rank 0 draws, §16)."""
    if not is_main_rank():
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_experiment_plots(root: Path, results: dict) -> list[str]:
    """forgetting_vs_count.png and drift.png (matplotlib, in requirements.txt)."""
    plt = pyplot()
    if plt is None:
        return []
    written = []
    rows = [r for res in results.values() for r in res["rows"] if r["method"] in ("sft", "selfdistill") and r.get("fit_target") is None]
    series = sorted({(r["key"], r["method"], r["width"]) for r in rows})
    if series:
        fig, ax = plt.subplots(figsize=(6, 4))
        widths = sorted({w for _, _, w in series})
        for key, method, width in series:
            points = sorted({(r["count"], r["forgetting"]) for r in rows if (r["key"], r["method"], r["width"]) == (key, method, width)})
            ax.plot([c for c, _ in points], [100 * f for _, f in points], color="C0" if key == "name" else "C1",
                    linestyle="-" if method == "sft" else "--", marker="os^v"[widths.index(width) % 4],
                    label=f"{key} keys, {CONDITION_NAMES[method]}, width {width}")
        ax.set_xscale("log")
        ax.set_xlabel("new facts")
        ax.set_ylabel("forgetting of held-out known facts (%)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(root / "forgetting_vs_count.png", dpi=120)
        plt.close(fig)
        written.append("forgetting_vs_count.png")
    if "interference" in results:
        res = results["interference"]
        top = res["counts"][-1]
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in [find_row(res["rows"], key=k, count=top, method=m) for m in ("sft", "selfdistill", "l2") for k in KEY_TYPES] + [find_row(res["rows"], method="known_only")]:
            if r is not None:
                ax.plot(range(len(r["curve"]) + 1), [0.0] + [100 * p["drift"] for p in r["curve"]], marker=".", label=condition_name(r))
        ax.set_xticks(range(len(r["curve"]) + 1), ["base", "stage 1"] + [str(e) for e in range(1, len(r["curve"]))])
        ax.set_xlabel("training (stage 2 epochs)")
        ax.set_ylabel("drift of held-out entities, 1 - cos (%)")
        ax.set_title(f"{top} new facts")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(root / "drift.png", dpi=120)
        plt.close(fig)
        written.append("drift.png")
        by_relation = [(label.replace(" | ", ", "), runs) for label, runs in interference_anatomy_rows([res["rows"]], res["relation"])
                       if not label.endswith("| all")]  # the split by relation is the point; "all" is in the table
        if plot_anatomy(root / "anatomy.png", by_relation, f"Where the forgetting comes from, {top} new facts"):
            written.append("anatomy.png")
    return written


def experiments_markdown(results: dict, plots: list[str], cfg: Config, seconds: float) -> str:
    first = next(iter(results.values()))
    teachers = "; ".join(f"width {w}: D_held {pct(t['held_acc'])}, drift {pct2(t['drift'])}" for w, t in first["teacher"].items())
    parts = [f"# sftguard --experiment {cfg.experiment}, preset {cfg.preset}, seed {cfg.seed}\n",
             f"Each condition: stage 2 from the teacher ({teachers}) on D_known + N synthetic new facts, {cfg.epochs} epochs "
             f"unless stated. Forgetting: relative drop of D_held accuracy from the teacher. Drift: {first['drift']}. "
             f"All numbers are %. {seconds / 60:.1f} minutes.\n"]
    for name, writer in (("interference", interference_markdown), ("capacity", capacity_markdown), ("cloning", cloning_markdown)):
        if name in results:
            parts.append(writer(results[name]))
    parts.append("".join(f"![{p}]({p})\n" for p in plots) if plots else
                 "Plots skipped: matplotlib is not installed (pip install -r requirements.txt).\n")
    return "\n".join(parts)


# =====================================================================================================
# 7c. Where forgetting comes from: the first epoch's shock, the residue it leaves, the later drift
# =====================================================================================================
# Read off a run's per-epoch held-out curve, in points of accuracy lost from the teacher (epoch 0). On the default
# world every method that sees new facts drops in stage-2 epoch 1 (the shock), recovers part of it by epochs 2-4
# (what stays is the residue), and then loses more while it fits the new facts (the drift). Self-distillation,
# whose KL term holds the outputs to the teacher's, removes the drift: the paper's argument, made visible.
SETTLE_EPOCHS = (2, 4)  # the residue is read at the best held-out accuracy of these epochs (clipped to the curve)


@dataclass
class ForgettingAnatomy:
    """Accuracy lost from the teacher (fractions; shown as points): shock = at epoch 1, residue = at the best of
    epochs 2-4 (epoch 1 if the run ends there), drift = from there to the end, total = at the end = residue + drift."""
    shock: float
    residue: float
    drift: float
    total: float


def forgetting_anatomy(curve: list[dict], key: str = "held_acc") -> ForgettingAnatomy | None:
    """The decomposition of one curve [{"epoch": 0 (the teacher), key: accuracy}, {"epoch": 1, ...}, ...]; None
    without a stage-2 epoch or where an accuracy is missing or nan (e.g. no held-out fact of that relation)."""
    acc = {p["epoch"]: p.get(key) for p in curve}
    if 0 not in acc or 1 not in acc or any(a is None or math.isnan(a) for a in acc.values()):
        return None
    last = max(acc)
    settled = max([acc[e] for e in range(SETTLE_EPOCHS[0], min(SETTLE_EPOCHS[1], last) + 1) if e in acc] or [acc[1]])
    residue, total = acc[0] - settled, acc[0] - acc[last]
    return ForgettingAnatomy(shock=acc[0] - acc[1], residue=residue, drift=total - residue, total=total)


SHARE_MIN_TOTAL = 0.02  # residue / total is shown where the (mean) total is at least 2 points: a ratio of noise otherwise


def anatomy_cells(anatomies: list[ForgettingAnatomy | None]) -> list[str]:
    """Shock, residue, drift, total and residue / total as table cells: one run's points, or mean ± sd over seeds (the
    share: of the means)."""
    runs = [a for a in anatomies if a is not None]
    if not runs:
        return ["–"] * 5
    show = (lambda xs: pct(xs[0])) if len(runs) == 1 else mean_sd  # noqa: E731
    residue, total = (statistics.mean(getattr(a, part) for a in runs) for part in ("residue", "total"))
    share = pct(residue / total) if total >= SHARE_MIN_TOTAL else "–"
    return [show([getattr(a, part) for a in runs]) for part in ("shock", "residue", "drift", "total")] + [share]


ANATOMY_HEAD = "shock (epoch 1) | residue (best of epochs 2–4) | drift (after) | total (final) | residue / total %"


def anatomy_markdown(head: str, rows: list[tuple[str, list[ForgettingAnatomy | None]]]) -> str:
    """A table of where each row's forgetting came from; head names the leading column(s), each row gives their cells
    ("a | b") and its runs' decompositions (one, or one per seed)."""
    width = head.count("|") + 6
    lines = ["Where the forgetting comes from: points of D_held accuracy lost from the teacher at stage-2 epoch 1 "
             "(shock), at the best of epochs 2–4 (residue) and after that (drift); total = residue + drift (README: "
             "Where forgetting comes from).", "", f"| {head} | {ANATOMY_HEAD} |", "|" + "---|" * width]
    lines += [f"| {cells} | " + " | ".join(anatomy_cells(anatomies)) + " |" for cells, anatomies in rows]
    return "\n".join(lines) + "\n"


def plot_anatomy(path: Path, rows: list[tuple[str, list[ForgettingAnatomy | None]]], title: str) -> bool:
    """anatomy.png: shock, residue and drift per row (mean over seeds, error bar ± sd). False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    rows = [(label, [a for a in runs if a is not None]) for label, runs in rows]
    rows = [(label, runs) for label, runs in rows if runs]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.4), dpi=120)
    for j, (part, color) in enumerate((("shock", "C3"), ("residue", "C1"), ("drift", "C0"))):
        values = [[100 * getattr(a, part) for a in runs] for _, runs in rows]
        means = [statistics.mean(v) for v in values]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar([i + (j - 1) * 0.27 for i in range(len(rows))], means, 0.27, yerr=sds, color=color, capsize=2,
               label={"shock": "shock: lost at epoch 1", "residue": "residue: still lost at the best of epochs 2–4",
                      "drift": "drift: lost after that"}[part])
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(rows)), [label for label, _ in rows], fontsize=8, rotation=15, ha="right")
    ax.set_ylabel("points of D_held accuracy lost from the teacher")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def anatomy_report(results: list[dict], plot_dir: Path | None = None, title: str = "") -> str:
    """The main study's table (one row per method; results of one seed, or lists of one method's results over seeds),
    and anatomy.png in plot_dir when given."""
    per_method = [rs if isinstance(rs, list) else [rs] for rs in results]
    rows = [(rs[0].get("run") or run_name(rs[0]["method"], rs[0]["trainable"]), [forgetting_anatomy(r["curve"]) for r in rs])
            for rs in per_method]  # a sweep's runs by their folder
    text = anatomy_markdown("method", rows)
    if plot_dir is not None and plot_anatomy(plot_dir / "anatomy.png", rows, title or "Where the forgetting comes from"):
        text += "\n![where the forgetting comes from](anatomy.png)\n"
    return text


def interference_anatomy_rows(rows_per_seed: list[list[dict]], relation: str) -> list[tuple[str, list]]:
    """The interference experiment at its largest count, per part of D_held: every held-out fact, those asked with the
    new facts' relation, those of the other relations. rows_per_seed: each seed's rows (the same conditions in order)."""
    first = rows_per_seed[0]
    top = max(r["count"] for r in first)
    picked = [i for i, r in enumerate(first) if r["count"] == top or r["method"] == "known_only"]
    parts = (("held_acc", "all"), ("held_same_relation_acc", f"same relation ({relation})"), ("held_other_relations_acc", "other relations"))
    return [(f"{condition_name(first[i])} | {first[i]['count']} | {part}",
             [forgetting_anatomy(seed_rows[i]["curve"], key) for seed_rows in rows_per_seed])
            for i in picked for key, part in parts]


# #####################################################################################################
# PART III. ENGINEERING: skip on a first read.
#   The same self-distillation loss, fast (tested equal to Eq. 1-2), precision and memory, checkpoints and atomic
#   writes, output folders, input checks, repeated runs (--sweep, --seeds), the practitioners' tools, the command line.
# #####################################################################################################


# =====================================================================================================
# 8. The fast self-distillation path and the teacher caches (tests/test_distill_fast.py: equal to Eq. 1-2)
# =====================================================================================================
# The same loss, fast. Cross-entropy and KL are taken together a chunk of answer tokens at a time, and their
# gradient is written out in that same pass, so the backward pass recomputes nothing and no full-vocabulary
# probabilities outlive their chunk: the one [answer tokens, vocabulary] tensor kept is the gradient, where plain
# cross-entropy keeps its log-probabilities (and a copy of the answer tokens' logits while it runs). And since the
# stage-2 inputs are fixed and the teacher frozen, the teacher's answer tokens can be computed once
# (build_teacher_cache) instead of by a forward pass every step: as its last hidden states (the default; its
# log-probabilities are one matmul with its output layer away) or as log-probabilities. A live teacher, too, runs
# its output layer on the answer tokens alone where the model allows (output_layer_separable).
# tests/test_distill_fast.py checks loss and gradients against self_distillation_loss.
def self_distillation_loss_chunked(student_logits, teacher_rows, targets, kl_weight: float, temperature: float,
                                   chunk: int, teacher_ids=None, teacher_head=None):
    """Eq. 1-2 as in self_distillation_loss (student_logits [N, V], targets [N]), with the teacher given one row per
    answer token, as teacher_answer_log_probs and cached_teacher_rows give them: log-probabilities at tau, or with
    teacher_head (the teacher's output layer, unscaled) its last hidden states, with or without log-normalisers.
    Returns (loss, kl)."""
    if len(targets) != len(teacher_rows):
        raise RuntimeError(f"{len(teacher_rows)} teacher rows for {len(targets)} answer tokens: "
                           f"the teacher cache was built for other examples than this batch")
    return ChunkedSelfDistillation.apply(student_logits, targets, teacher_rows, teacher_ids, teacher_head, kl_weight,
                                         temperature, chunk)


class ChunkedSelfDistillation(torch.autograd.Function):
    """(CE + kl_weight * tau^2 * KL, KL) over the N answer tokens (logits [N, V], targets [N]), `chunk` rows at a time,
    each taken to float32 only then, with the gradient computed in the forward pass:
        d loss / d logits = [softmax(z) - onehot(y) + kl_weight * tau * (p_student^tau - q)] / N.

    q is the teacher at tau: full-vocabulary log-probabilities [N, V] (any float dtype); or with teacher_ids [N, k]
    the top-k log-probabilities plus the tail's log-mass in a last column [N, k + 1] (see topk_teacher_log_probs); or with
    teacher_head = (weight, bias), the teacher's output layer as it is (one convention for the cache and a live
    teacher), its last hidden states [N, d] (log-softmax taken here) or those plus the log-normaliser of its logits at
    tau in a last column [N, d + 1] (the cache: one pass fewer), turned into log-probabilities a chunk at a time as
    F.linear(hidden, weight, bias) / tau. The KL output is for logging: it carries no gradient."""

    @staticmethod
    def forward(ctx, logits, targets, teacher_rows, teacher_ids, teacher_head, kl_weight: float, temperature: float,
                chunk: int):
        n = max(len(targets), 1)
        grad = torch.empty(len(targets), logits.shape[-1], device=logits.device)  # d loss / d answer-token logits
        ce, kl = torch.zeros((), device=logits.device), torch.zeros((), device=logits.device)
        for start in range(0, len(targets), chunk):  # each line below is one or two passes over a [chunk, V] block
            rows = slice(start, start + chunk)
            z, y = logits[rows].float(), targets[rows]
            picked = (torch.arange(len(y), device=y.device), y)  # each row's target token
            log_p_tau = F.log_softmax(z / temperature, dim=-1)
            log_q = teacher_log_probs(log_p_tau, teacher_rows, teacher_ids, teacher_head, rows, temperature)
            q = log_q.exp()
            kl += q.view(-1).dot(log_q.view(-1)) - q.view(-1).dot(log_p_tau.view(-1))  # sum q (log q - log p), no copy
            del log_q  # one [chunk, V] block fewer alive for the rest of the chunk
            log_sum_exp = z.logsumexp(-1)
            ce += (log_sum_exp - z[picked]).sum()
            # softmax(z) / n, written straight into the gradient, then + kl_weight * tau * (p_tau - q) / n - onehot / n
            torch.sub(z, (log_sum_exp + math.log(n))[:, None], out=grad[rows]).exp_()
            grad[rows].add_(log_p_tau.exp_().sub_(q), alpha=kl_weight * temperature / n)
            grad[rows][picked] -= 1 / n
        ctx.save_for_backward(grad)
        ctx.dtype = logits.dtype
        kl = kl / n
        ctx.mark_non_differentiable(kl)
        return ce / n + kl_weight * temperature**2 * kl, kl

    @staticmethod
    def backward(ctx, grad_loss, grad_kl):
        grad, = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.dtype), None, None, None, None, None, None, None


def teacher_log_probs(log_p_student, teacher_rows, teacher_ids, teacher_head, rows, temperature: float):
    """log q, the teacher at tau, on the given rows, in float32, whichever of the three encodings the rows hold:
    hidden states (teacher_head given), top-k + tail (teacher_ids given), or full log-probabilities (neither)."""
    if teacher_head is not None:
        return teacher_log_probs_from_hidden(teacher_rows[rows], teacher_head, temperature)
    if teacher_ids is None:
        return teacher_rows[rows].float()
    return topk_teacher_log_probs(log_p_student, teacher_rows[rows].float(), teacher_ids[rows].long())


def teacher_log_probs_from_hidden(hidden_rows, teacher_head, temperature: float):
    """log q at tau from last hidden states [n, d], or [n, d + 1] with the log-normaliser of the teacher's logits at tau
    last (the cache: one pass fewer); teacher_head = (weight, bias), the teacher's output layer: logits = F.linear."""
    weight, bias = teacher_head
    logits = F.linear(hidden_rows[:, :weight.shape[1]].to(weight.dtype), weight, bias).float().div_(temperature)  # [n, V]
    if hidden_rows.shape[1] == weight.shape[1]:
        return F.log_softmax(logits, dim=-1)
    return logits.sub_(hidden_rows[:, -1:])


def topk_teacher_log_probs(log_p_student, top_and_tail, ids):
    """Top-k + tail bucket: the teacher's k most likely tokens exactly, and its remaining mass spread over the other
    tokens in the student's proportions. KL to this q is the KL over k + 1 bins (top-k tokens, the tail), a lower
    bound of the full KL that equals it when the teacher's tail has the student's shape."""
    log_tail_teacher = top_and_tail[:, -1:].clamp_min(-1e4)  # -inf when the top-k hold all the mass
    log_tail_student = log_p_student.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(-1e4)
    return (log_p_student + log_tail_teacher - log_tail_student).scatter(-1, ids, top_and_tail[:, :-1])


def teacher_answer_log_probs(teacher_logits, labels, temperature: float):
    """log p_teacher^tau at the answer tokens, one row per token in the order of labels != -100."""
    return F.log_softmax(teacher_logits[labels != -100].float() / temperature, dim=-1)


def teacher_cache_mode(teacher, batches, cfg: Config) -> str:
    """cfg.teacher_cache, with auto resolved to the most compact exact cache: hidden if the teacher's logits are its
    output layer on its last hidden state (checked on one example), else fp32 if it fits in teacher_cache_max_mb,
    else live."""
    if cfg.teacher_cache == "hidden" and not logits_from_last_hidden(teacher, batches):
        raise UserError("--teacher_cache hidden: this model's logits are not its output layer applied to its last hidden "
                        "state (e.g. soft-capped or scaled logits); use --teacher_cache fp32 or live")
    if cfg.teacher_cache != "auto":
        return cfg.teacher_cache
    if not isinstance(batches, QABatches):  # no training set to cache
        return "live"
    if logits_from_last_hidden(teacher, batches):
        return "hidden"
    cache_bytes = batches.answer_tokens * teacher.get_output_embeddings().weight.shape[0] * 4
    return "fp32" if cache_bytes <= cfg.teacher_cache_max_mb * 2**20 else "live"


@torch.no_grad()
def teacher_forward_with_hidden(teacher, batch):
    """(logits, the input of the output layer): the hidden states the cache keeps, whatever the architecture."""
    seen = []
    hook = teacher.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0]))
    try:
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        hook.remove()
    return logits, seen[0]


def teacher_output_layer(teacher, snapshot: bool = False):
    """(weight, bias) of the teacher's output layer, unscaled (the loss divides its logits by tau). snapshot: copies,
    for a cache that must stay what it was when built even if the model it came from trains on afterwards."""
    head = teacher.get_output_embeddings()  # full_tensor: a sharded teacher's whole output layer (§16)
    weight, bias = full_tensor(head.weight.detach()), None if head.bias is None else full_tensor(head.bias.detach())
    return (weight.clone(), None if bias is None else bias.clone()) if snapshot else (weight, bias)


def logits_from_last_hidden(teacher, batches, from_base_model: bool = False) -> bool:
    """Whether logits == output layer(last hidden state) on the first training example (not so for soft-capped or
    rescaled logits, as in Gemma 2 or Cohere), so that the hidden-state cache is exact; with from_base_model, also
    whether the base model alone returns that hidden state (so a live teacher may stop there)."""
    head = teacher.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or batches is None:  # no example to check on: the plain path
        return False
    if from_base_model and (teacher.base_model is teacher or is_sharded(teacher)):  # FSDP2 gathers in the full forward (§16)
        return False
    teacher.eval()
    device = head.weight.device
    first = batches.batch_of([0]) if isinstance(batches, QABatches) else next(iter(batches(torch.Generator().manual_seed(0))))
    batch = {k: v[:1].to(device) for k, v in first.items()}
    logits, hidden = teacher_forward_with_hidden(teacher, batch)
    weight, bias = full_tensor(head.weight), None if head.bias is None else full_tensor(head.bias)  # sharded: all of it (§16)
    same = logits.shape[:-1] == hidden.shape[:-1] and torch.allclose(F.linear(hidden, weight, bias).float(),
                                                                     logits.float(), rtol=1e-4, atol=1e-4)
    if same and from_base_model:
        same = torch.allclose(teacher_last_hidden(teacher, batch).float(), hidden.float(), rtol=1e-4, atol=1e-4)
    return same


@torch.no_grad()
def teacher_last_hidden(teacher, batch):
    """The teacher's last hidden states from its base model, without running its output layer."""
    return teacher.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]


def output_layer_separable(teacher, batches) -> bool:
    """Whether a live teacher may skip its output layer at prompt tokens: its logits are its output layer on its last
    hidden states, and its base model returns those states (both checked on the first training example)."""
    return logits_from_last_hidden(teacher, batches, from_base_model=True)


@torch.no_grad()
def build_teacher_cache(teacher, batches, cfg: Config, mode: str) -> dict:
    """The teacher on every answer token of the training set, computed once.

    Rows are kept in example order: rows offsets[i]:offsets[i+1] are example i's answer tokens, left to right, so
    a batch in any order finds its rows by its examples' "index". mode: hidden (exact): the teacher's last hidden
    states, each with the log-normaliser of its logits at tau (float32), and a copy of its output layer in "head";
    fp32 (exact) or bf16 full-vocabulary log-probabilities at tau; topk: the teacher_topk largest log-probabilities,
    their token ids and the tail's log-mass."""
    if not isinstance(batches, QABatches):
        raise TypeError("a cached teacher is built on the training batches: pass method_loss the qa_batches it will see")
    teacher.eval()
    device = next(teacher.parameters()).device
    separable = output_layer_separable(teacher, batches)  # then the output layer runs on the answer tokens alone

    def batch_rows(start):  # (answer tokens per example, rows, ids or None) of the batch starting at `start`
        batch = batches.batch_of(list(range(start, min(start + cfg.batch_size, batches.size))))  # training-sized batches:
        batch = {k: v.to(device) for k, v in batch.items()}  # no higher memory peak
        labels = batch["labels"][:, 1:]
        answer = labels != -100
        if separable:  # [N, d] and [N, V] at the answer tokens only
            hidden = teacher_last_hidden(teacher, batch)[:, :-1][answer]
            logits = teacher.get_output_embeddings()(hidden)
        else:
            logits, hidden = teacher_forward_with_hidden(teacher, batch)
            logits, hidden = logits[:, :-1][answer], hidden[:, :-1][answer]
        if mode == "hidden":  # log q = (hidden @ weight + bias) / tau - log_norm: one matmul, a division, a subtraction
            log_norm = (logits.float() / cfg.temperature).logsumexp(-1, keepdim=True)
            return answer.sum(1).tolist(), torch.cat([hidden.float(), log_norm], dim=-1), None
        log_p = F.log_softmax(logits.float() / cfg.temperature, dim=-1)
        if mode == "topk":
            top, top_ids = log_p.topk(min(cfg.teacher_topk, log_p.shape[-1]), dim=-1)
            log_tail = log_p.scatter(-1, top_ids, float("-inf")).logsumexp(-1, keepdim=True)
            return answer.sum(1).tolist(), torch.cat([top, log_tail], dim=-1), top_ids.int()
        return answer.sum(1).tolist(), log_p.to(torch.bfloat16 if mode == "bf16" else torch.float32), None

    # under torchrun each rank computes its share of the batches and every rank gets all the rows (§16)
    parts = on_ranks(batch_rows, range(0, batches.size, cfg.batch_size), teacher, desc="teacher cache")
    offsets = [0] + torch.tensor([n for counts, _, _ in parts for n in counts], dtype=torch.long).cumsum(0).tolist()
    rows, ids = [r.to(device) for _, r, _ in parts], [i.to(device) for _, _, i in parts if i is not None]
    cache = {"rows": torch.cat(rows), "ids": torch.cat(ids) if ids else None, "offsets": offsets,
             "head": teacher_output_layer(teacher, snapshot=True) if mode == "hidden" else None}
    tqdm.write(f"teacher cache ({mode}): {len(cache['rows'])} answer tokens of {batches.size} examples, "
               f"{teacher_cache_bytes(cache) / 2**20:.1f} MB")
    return cache


def teacher_cache_bytes(cache: dict) -> int:
    tensors = [cache["rows"], cache["ids"], *(cache["head"] or ())]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def cached_teacher_rows(cache: dict, index: torch.Tensor):
    """The cached rows of a batch's examples, in the order of the batch's answer tokens: (rows, ids or None)."""
    offsets = cache["offsets"]
    rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in index.tolist()]).to(cache["rows"].device)
    return cache["rows"][rows], None if cache["ids"] is None else cache["ids"][rows]


def fast_self_distillation_loss(teacher, cfg: Config, batches=None):
    """method_loss("selfdistill") with --kl_chunk > 0: Eq. 1-2 by self_distillation_loss_chunked, the teacher from a
    cache built once on `batches` (--teacher_cache) or live, its output layer on the answer tokens alone if it can."""
    mode = teacher_cache_mode(teacher, batches, cfg)
    if mode != "live":  # the teacher's answer tokens, once; the loss holds them, not the teacher
        with model_precision(teacher, cfg).autocast():  # as a live teacher would run inside train()
            cache = build_teacher_cache(teacher, batches, cfg, mode)

        def cached_loss_fn(logits, targets, batch):
            teacher_rows, teacher_ids = cached_teacher_rows(cache, batch["index"])
            return self_distillation_loss_chunked(logits, teacher_rows, targets, cfg.kl_weight, cfg.temperature,
                                                  cfg.kl_chunk, teacher_ids, cache["head"])[0]
        return cached_loss_fn

    # A live teacher: a forward pass every step. Where the model allows, only up to its last hidden states: its
    # output layer then runs on the answer tokens alone, a chunk at a time inside the loss (its own weights: no copy).
    answer_only_head = output_layer_separable(teacher, batches)
    head = teacher_output_layer(teacher)

    def loss_fn(logits, targets, batch):
        labels = batch["labels"][:, 1:]
        with torch.no_grad():  # the teacher is frozen: no gradient, eval mode
            if answer_only_head:
                hidden = teacher_last_hidden(teacher, batch)[:, :-1][labels != -100].float()  # [N, d]
            else:
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        if answer_only_head:
            return self_distillation_loss_chunked(logits, hidden, targets, cfg.kl_weight, cfg.temperature, cfg.kl_chunk,
                                                  teacher_head=head)[0]
        return self_distillation_loss_chunked(logits, teacher_answer_log_probs(teacher_logits, labels, cfg.temperature),
                                              targets, cfg.kl_weight, cfg.temperature, cfg.kl_chunk)[0]
    return loss_fn


def loss_runs_teacher(method: str, teacher, batches, cfg: Config) -> bool:
    """Whether method_loss(method, ...) runs the teacher at every step: self-distillation with a live teacher (the plain
    Eq. 1-2 path, --kl_chunk 0, or --teacher_cache live / auto that found no cache); not a cached teacher, sft, l2, ..."""
    return method == "selfdistill" and (cfg.kl_chunk == 0 or teacher_cache_mode(teacher, batches, cfg) == "live")


@contextlib.contextmanager
def teacher_off_device(teacher, runs_teacher: bool):
    """While a loss that does not run the teacher trains (loss_runs_teacher false), the teacher waits in CPU memory and
    comes back to its GPU afterwards (the next method copies it); on a CPU nothing moves."""
    device = next(teacher.parameters()).device
    # a sharded (FSDP2) teacher stays: its shards are 1/N of it, and its device mesh is the GPUs' (§16)
    away = device.type != "cpu" and not runs_teacher and not is_sharded(teacher)
    if away:
        teacher.to("cpu")
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        if away:
            teacher.to(device)


# =====================================================================================================
# 8b. SliCK's sampled answers, one prefill per prompt (tests/test_protocol.py: the answers of plain generate())
# =====================================================================================================
def prefills_once(model) -> bool:
    """Whether generate_prefilling_once applies: a decoder-only model with the default key/value cache (DynamicCache),
    whose forward takes position ids and a cache; others (recurrent, encoder-decoder, custom caches) go the plain way."""
    params = inspect.signature(model.forward).parameters
    return (not model.config.is_encoder_decoder and "position_ids" in params and cache_keyword(params) in params
            and getattr(type(model), "_supports_default_dynamic_cache", lambda: False)())


def cache_keyword(forward_params) -> str:
    """The name of the key/value cache argument: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in forward_params else "past_key_values"


@torch.no_grad()
def generate_prefilling_once(model, enc, gen_config, **kwargs):
    """model.generate(**enc, generation_config=gen_config) with n = num_return_sequences samples a prompt, and each
    prompt's prefill computed once. generate() copies every prompt n times before its prefill; at SliCK's 16 samples
    of a few-shot prompt of ~70 tokens, for answers of a few tokens, those copies are most of the labelling's compute.
    Here the prompts but their last token are run once, the cache is copied n times (in generate()'s order: each
    prompt's copies side by side) and generate() continues from it: the same rows in the same order draw the same
    random numbers, so the same answers, up to the rounding of a cached against an uncached forward pass.
    [B, L] prompts -> [B * n, L + new] sequences, as generate() returns."""
    from transformers import DynamicCache

    n = gen_config.num_return_sequences or 1
    if n <= 1 or not prefills_once(model) or enc["input_ids"].shape[1] < 2:
        return model.generate(**enc, generation_config=gen_config, **kwargs)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate() numbers left-padded positions
    params = inspect.signature(model.forward).parameters
    cache, key = DynamicCache(config=model.config), cache_keyword(params)
    # the prefill's logits are not needed, only its cache: one position's, not [B, L-1, V], where the model allows it
    one_logit = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
          **{key: cache}, **one_logit)  # [B, L-1]: the last token goes through generate(), which needs its logits
    cache.batch_repeat_interleave(n)  # [B, ...] -> [B * n, ...]
    once = copy.deepcopy(gen_config)
    once.num_return_sequences = 1
    return model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                          generation_config=once, **{key: cache}, **kwargs)


# =====================================================================================================
# 9. Parameter groups by module structure (what --trainable names mean on any architecture)
# =====================================================================================================
# Parameter groups by module structure, so that they mean the same on every decoder-only architecture: the decoder
# blocks are the base model's list of layers; in each block the attention is the child the block calls for
# self-attention (an *Attention* / *Attn* class, or the one holding q/k/v or fused qkv projections) and the
# feed-forward is the *MLP* / *FeedForward* / *MoE* child (experts and router included) or Linear layers sitting
# directly on the block (OPT's fc1, fc2). Norms are a group of their own, in no other: a block's layer norms,
# the q/k norms inside attention (Qwen3, OLMo-2, Gemma-3), the final norm, so attention-only and MLP-only both
# keep them frozen. What fits nowhere (e.g. a state-space mixer) is in no group and trains only under all / a regex.
PARAM_GROUPS = {
    "attn": "each block's self-attention: q/k/v/o or fused qkv projections, without the q/k norms",
    "mlp": "each block's feed-forward: MLP, MoE experts and router, or Linear layers directly on the block",
    "embed": "input embeddings, learned position embeddings and the output layer (one matrix when tied)",
    "norm": "every normalisation layer: in the blocks, q/k norms inside attention, the final norm",
    "all": "every parameter",
}


ATTENTION_CLASS = re.compile(r"attention|attn", re.I)
FEED_FORWARD_CLASS = re.compile(r"mlp|feedforward|ffn|moe|expert", re.I)
ATTENTION_PROJECTION = re.compile(r"^(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|wqkv)\.", re.I)
FEED_FORWARD_PROJECTION = re.compile(r"^(up_proj|down_proj|gate_proj|gate_up_proj|fc1|fc2|fc_in|c_fc|w1|w2|w3|dense_h_to_4h)\.", re.I)


def is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()  # LayerNorm, RMSNorm, LlamaRMSNorm, CohereLayerNorm, ...


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The list of decoder blocks (model.layers, transformer.h, model.decoder.layers, ...): the shallowest ModuleList."""
    lists = [(name.count("."), module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module)]
    if not lists:
        raise UserError(f"--trainable: {type(model).__name__} has no list of decoder blocks; pass a regex on parameter names")
    return min(lists, key=lambda depth_and_list: depth_and_list[0])[1]


def block_child_group(child) -> str | None:
    """attn, mlp or norm for a child module of a decoder block; None when it is none of them."""
    if is_norm(child):
        return "norm"
    names = [n for n, _ in child.named_parameters()]
    if ATTENTION_CLASS.search(type(child).__name__) or any(ATTENTION_PROJECTION.match(n) for n in names):
        return "attn"
    if FEED_FORWARD_CLASS.search(type(child).__name__) or any(FEED_FORWARD_PROJECTION.match(n) for n in names):
        return "mlp"
    return "mlp" if isinstance(child, torch.nn.Linear) else None  # a feed-forward layer directly on the block


def parameter_groups(model) -> dict[str, str | None]:
    """{parameter name: attn | mlp | embed | norm | None}, decided by module structure (see PARAM_GROUPS)."""
    group_of = {}  # id(parameter) -> group; the first claim wins (a tied output layer is the input embedding)

    def claim(module, group):
        for sub in module.modules():
            for p in sub.parameters(recurse=False):
                group_of.setdefault(id(p), "norm" if is_norm(sub) else group)
    for block in decoder_blocks(model):
        for child in block.children():
            claim(child, block_child_group(child))
    claim(model.get_input_embeddings(), "embed")
    if model.get_output_embeddings() is not None:
        claim(model.get_output_embeddings(), "embed")
    for module in model.modules():  # the rest: learned position embeddings (GPT-2's wpe, OPT's embed_positions), norms
        for p in module.parameters(recurse=False):
            group_of.setdefault(id(p), "embed" if isinstance(module, torch.nn.Embedding) else "norm" if is_norm(module) else None)
    return {name: group_of.get(id(p)) for name, p in model.named_parameters()}


def chosen_parameter_names(model, spec: str) -> list[str]:
    """The names --trainable picks: 'attn,mlp' -> those groups; 'layers:0,1' -> the blocks 0 and 1; else a regex."""
    if not spec.strip():
        raise UserError(f"--trainable is empty; name a group ({', '.join(PARAM_GROUPS)}), layers:0,1, or a regex")
    named = list(model.named_parameters())
    if spec.startswith("layers:"):
        numbers = [n.strip() for n in spec[len("layers:"):].split(",")]
        if not all(n.isdigit() for n in numbers):
            raise UserError(f"--trainable {spec!r}: write layers as layers:0,1")
        blocks = decoder_blocks(model)
        if max(map(int, numbers)) >= len(blocks):
            raise UserError(f"--trainable {spec!r}: this model has {len(blocks)} blocks, layers:0 to layers:{len(blocks) - 1}")
        inside = {id(p) for n in numbers for p in blocks[int(n)].parameters()}
        return [name for name, p in named if id(p) in inside]
    groups = [s.strip() for s in spec.split(",")]
    if all(g in PARAM_GROUPS for g in groups):
        group_of = parameter_groups(model)
        return [name for name, _ in named if "all" in groups or group_of[name] in groups]
    try:
        pattern = re.compile(spec)
    except re.error as e:
        raise UserError(f"--trainable {spec!r} is neither a group ({', '.join(PARAM_GROUPS)}) nor a valid regex ({e})") from None
    return [name for name, _ in named if pattern.search(name)]


# =====================================================================================================
# 10. Precision and the memory plan
# =====================================================================================================
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Precision:
    """Mixed precision: the weights and optimizer state stay float32 (master weights); the forward pass runs under
    autocast in `dtype` (None: float32 throughout); fp16 also scales the loss (GradScaler), as its range needs."""
    device_type: str
    dtype: torch.dtype | None
    scaler: "torch.amp.GradScaler | None" = None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def backward_and_step(self, loss, optimizer, params, grad_clip: float):
        """loss.backward(), gradient clipping, optimizer.step(); fp16 scales the loss and unscales before clipping."""
        if self.scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        # Autocast keeps its low-precision copies of the weights until its outermost context ends: under a caller's
        # context around train() the next forward pass would use the weights from before this step.
        torch.clear_autocast_cache()


def resolve_precision(name: str, device: torch.device) -> Precision:
    """--precision on this device; one that the device cannot run is a UserError (fp16 on a CPU, bf16 on a GPU without)."""
    cuda = device.type == "cuda"
    bf16_ok = not cuda or torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        name = ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    if name == "fp16" and not cuda:
        raise UserError("--precision fp16 needs a CUDA GPU (CPU autocast is bf16 only); use --precision bf16 or fp32")
    if name == "bf16" and not bf16_ok:
        raise UserError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --precision fp16 or fp32")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    return Precision(device.type, dtype, torch.amp.GradScaler("cuda") if name == "fp16" else None)


def model_precision(model, cfg: Config) -> Precision:
    return resolve_precision(cfg.precision, next(model.parameters()).device)


def sparse_tied_embedding_gradient(model):
    """Tied input and output embeddings (GPT-2, Qwen2.5-1.5B): the output layer's dense [V, d] gradient arrives first
    and becomes .grad; the input embedding's, a second dense [V, d] tensor of which only the batch's tokens' rows are
    not zero, is then made sparse, so it adds those rows in place (the same gradient, one [V, d] tensor fewer)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if world_size() > 1:  # DDP and FSDP2 reduce dense gradients only (§16)
        return
    if isinstance(embedding, torch.nn.Embedding) and head is not None and head.weight is embedding.weight:
        embedding.sparse = True


# --- The memory plan: what stage 2 will hold at its peak, against what the device has -------------------------
@dataclass
class MemoryPlan:
    """Bytes at the peak of a stage-2 step (estimates: the tensors' sizes, activations by a per-block count)."""
    weights: int  # the student, float32 master weights
    gradients: int
    optimizer: int  # AdamW: two float32 moments per trainable weight
    teacher: int  # a live teacher's weights, the teacher cache, l2's anchor, a teacher left in the same memory
    activations: int  # what the backward pass keeps, at the longest batch
    logits: int  # answer tokens x vocabulary: the logits, their float32 log-probabilities and gradient
    available: int  # the device's free memory plus what the teacher already holds there

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.teacher + self.activations + self.logits

    def line(self) -> str:
        gb = lambda x: f"{x / 2**30:.2f} GB" if x >= 2**30 else f"{x / 2**20:.1f} MB"  # noqa: E731
        parts = ("weights", "gradients", "optimizer", "teacher", "activations", "logits")
        return "memory plan: " + ", ".join(f"{k} {gb(getattr(self, k))}" for k in parts) + \
            f" = {gb(self.total)} of {gb(self.available)} available"


def device_memory_bytes(device: torch.device) -> int:
    """Free memory of the device: CUDA's free bytes, or a CPU's MemAvailable (/proc/meminfo)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise UserError("cannot read MemAvailable from /proc/meminfo to plan memory")


def activation_bytes(model, tokens: int, cfg: Config, act_bytes: int) -> int:
    """Per block and token the backward pass keeps ~10 hidden-wide and 4 MLP-wide tensors (norms, q/k/v, attention
    output, residuals, MLP input/gate/up/product); with checkpointing, one hidden-wide input per block plus one block."""
    c = model.config
    d, layers = c.hidden_size, c.num_hidden_layers
    mlp = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    block = tokens * (10 * d + 4 * mlp) * act_bytes
    return tokens * d * act_bytes * layers + block if cfg.gradient_checkpointing else block * layers


def memory_plan(teacher, batches, runs, cfg: Config, device: torch.device) -> MemoryPlan:
    """The largest stage-2 run among `runs` ((method, trainable) pairs) at cfg.batch_size on `device`."""
    n = count_params(teacher)
    trainable = max(sum(teacher.get_parameter(name).numel() for name in chosen_parameter_names(teacher, t))
                    if m == "freeze" else n for m, t in runs)
    teacher_bytes = sum(p.numel() * p.element_size() for p in teacher.parameters())
    vocab, d = teacher.get_output_embeddings().weight.shape
    act_bytes = 4 if resolve_precision(cfg.precision, device).dtype is None else 2
    longest = max(len(ids) for ids, _ in batches.examples)  # the encoded examples: no tensor per example
    answers = max(sum(t != -100 for t in labels[1:]) for _, labels in batches.examples) * cfg.batch_size
    # under torchrun a rank's batch is 1/N of the global one; FSDP2 also gives it 1/N of the model state (§16)
    ranks, shards = world_size(), world_size() if uses_fsdp(teacher, cfg) else 1
    teacher_bytes //= shards
    kept = teacher_bytes if device.type == "cpu" or shards > 1 else 0  # on a GPU the teacher leaves unless a loss reads it
    extra = [kept]
    if any(m == "l2" for m, _ in runs):
        extra.append(kept + trainable * 4 // shards)
    if any(m == "selfdistill" for m, _ in runs):
        mode = teacher_cache_mode(teacher, batches, cfg)
        row = {"hidden": d + 1, "fp32": vocab, "bf16": vocab / 2, "topk": 2 * cfg.teacher_topk + 1}.get(mode, 0)
        extra.append(teacher_bytes if mode == "live" else kept + int(batches.answer_tokens * row * 4) + vocab * d * 4 * (mode == "hidden"))
    separable = output_layer_separable(teacher, batches)
    logit_rows = answers if separable else longest * cfg.batch_size
    return MemoryPlan(weights=n * 4 // shards, gradients=trainable * 4 // shards, optimizer=trainable * 8 // shards,
                      teacher=max(extra),
                      activations=activation_bytes(teacher, longest * math.ceil(cfg.batch_size / ranks), cfg, act_bytes),
                      logits=(logit_rows * vocab * act_bytes + answers * vocab * 8) // ranks,
                      available=device_memory_bytes(device) + teacher_bytes)


def check_memory_plan(plan: MemoryPlan):
    print(plan.line())
    if plan.total > 1.1 * plan.available:
        raise UserError(f"stage 2 needs about {plan.total / 2**30:.1f} GB but the device has {plan.available / 2**30:.1f} GB: "
                        f"pass a smaller --batch_size, --gradient_checkpointing, an 8-bit optimizer (bitsandbytes, an optional "
                        f"extra), or several GPUs (torchrun --nproc_per_node N ... --fsdp on: README, More than one GPU)")


# =====================================================================================================
# 11. Checkpoints for --resume, atomic writes, output folders
# =====================================================================================================
# Checkpoints for --resume, written per stage so that a 7B run can afford them: the teacher once after stage 1,
# each method's result when it finishes, and the student after each stage-2 epoch only where that is cheap
# (--epoch_checkpoints): at 7B weights + AdamW state are ~85 GB and minutes to write. At most one student
# checkpoint exists: the last is deleted before the next is written, so a run killed in between restarts that
# method from the teacher, which gives the same numbers (seeded). Each is a folder written under a temporary
# name and then renamed into place, so a killed write leaves no half checkpoint. Weights are safetensors; the
# optimizer and RNG states are plain tensors, read back with torch.load(weights_only=True), which cannot run code.
EPOCH_CHECKPOINTS = ("auto", "always", "never")


MORE_SPACE = "free some space or choose another --out"
LESS_SPACE = "free some space, choose another --out, or pass --epoch_checkpoints never (with --resume, the run goes on)"


def model_bytes(model) -> int:
    """About what save_model writes: every parameter (a tied one once) and buffer."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def epoch_checkpoint_bytes(model) -> int:
    """One epoch checkpoint: the weights and AdamW's two moments of every trainable weight."""
    return model_bytes(model) + 2 * sum(p.numel() * p.element_size() for p in trainable_parameters(model))


def saves_epoch_checkpoints(model, cfg: Config) -> bool:
    """--epoch_checkpoints: always, never, or auto: while one is at most --epoch_checkpoint_max_mb."""
    if cfg.epoch_checkpoints == "auto":
        return epoch_checkpoint_bytes(model) <= cfg.epoch_checkpoint_max_mb * 2**20
    return cfg.epoch_checkpoints == "always"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def check_free_space(folder: Path, needed: int, what: str, fix: str, reclaimed: int = 0):
    """Refuse, before writing anything, a checkpoint the disk cannot hold (counting what will be deleted first)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # it may not be created yet
    free = shutil.disk_usage(existing).free + reclaimed
    if needed > free:
        raise UserError(f"{what} needs {needed / 1e9:.3g} GB in {folder} but its disk has {free / 1e9:.3g} GB free; {fix}")


def save_folder_atomic(folder: Path, write, every_rank: bool = False):
    """write(tmp) fills a fresh temporary folder beside `folder`, which is then renamed to `folder`. Under torchrun
    rank 0 writes (every_rank: each rank writes its shards into the same folder) and the others wait for it (§16)."""
    tmp = None
    if is_main_rank():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    if every_rank:
        tmp = same_on_every_rank(tmp)
    if tmp is not None:
        write(tmp)
    barrier()
    if is_main_rank():
        if folder.exists():  # rename(2) cannot replace a non-empty folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    barrier()  # the others may read it now


def save_hf_model(model, tokenizer, folder: Path):
    """A Hugging Face folder (safetensors weights, config, tokenizer) that AutoModelForCausalLM.from_pretrained loads."""
    model = savable_model(model)  # a sharded (FSDP2) model gathered whole on rank 0 (§16)

    def write(tmp: Path):
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
    save_folder_atomic(folder, write)


def write_text_atomic(path: Path, text: str):
    """Write to a temporary name, then rename: a run killed mid-write never leaves a half file. Rank 0 only (§16)."""
    if not is_main_rank():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_epoch_checkpoint(checkpoint_dir: Path, epoch: int, model, optimizer, generator, state: dict, bar=None):
    """Everything the next epoch depends on: weights, AdamW moments, the batch-order generator, the global RNGs.
    It replaces the last one, which is deleted first (once the disk is known to hold the new one)."""
    from safetensors.torch import save_model

    old = list(checkpoint_dir.glob("epoch-*"))
    try:
        check_free_space(checkpoint_dir, epoch_checkpoint_bytes(model), "the student's epoch checkpoint", LESS_SPACE,
                         reclaimed=sum(map(folder_bytes, old)))
    except UserError:  # a full disk: the message starts a line of its own
        if bar is not None:
            bar.close()
        raise
    barrier()  # under torchrun: every rank has measured the old checkpoint before rank 0 deletes it (§16)
    for path in old if is_main_rank() else ():
        shutil.rmtree(path)

    def write(tmp: Path):
        if not save_sharded_state(tmp, model, optimizer):  # FSDP2: DCP, each rank its shards (§16)
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if not is_main_rank():
            return
        rng = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch, "python_random": random.getstate()}))

    save_folder_atomic(checkpoint_dir / f"epoch-{epoch:04d}", write, every_rank=is_sharded(model))


def resumed_teacher(checkpoint_dir: Path | None, model) -> dict | None:
    """--resume after stage 1: the teacher's weights loaded into model from checkpoint_dir/teacher/ and its stage-1
    record returned; None when no teacher was saved there."""
    from safetensors.torch import load_model

    saved = checkpoint_dir / "teacher" if checkpoint_dir is not None else None
    if saved is None or not (saved / "stage1.json").is_file():
        return None
    if not load_sharded_state(saved, model):  # a DCP checkpoint of FSDP2 (§16)
        load_model(model, saved / "model.safetensors", device=str(next(model.parameters()).device))
    tqdm.write(f"stage 1: resumed the teacher from {saved}")
    return json.loads((saved / "stage1.json").read_text())


def check_room_for_checkpoints(checkpoint_dir: Path | None, model, cfg: Config):
    """Before stage 1: the disk must hold the teacher and, where they are written, the largest epoch checkpoint."""
    if checkpoint_dir is None:
        return
    epoch_bytes = epoch_checkpoint_bytes(model) if saves_epoch_checkpoints(model, cfg) else 0
    check_free_space(checkpoint_dir, model_bytes(model) + epoch_bytes,
                     "the teacher and an epoch checkpoint" if epoch_bytes else "the teacher", LESS_SPACE if epoch_bytes else MORE_SPACE)


def save_teacher_checkpoint(checkpoint_dir: Path | None, teacher, stage1: dict, cfg: Config):
    """The one teacher checkpoint, written once after stage 1, with the run's config (--resume checks its flags)."""
    from safetensors.torch import save_model

    if checkpoint_dir is None:
        return
    check_free_space(checkpoint_dir, model_bytes(teacher), "the teacher", MORE_SPACE)

    def write(tmp: Path):
        if not save_sharded_state(tmp, teacher):  # FSDP2: DCP, each rank its shards (§16)
            save_model(teacher, str(tmp / "model.safetensors"))
        if not is_main_rank():
            return
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))  # --resume checks its flags against these
        (tmp / "stage1.json").write_text(json.dumps(stage1))
    save_folder_atomic(checkpoint_dir / "teacher", write, every_rank=is_sharded(teacher))


def resumed_training(checkpoint_dir: Path | None, model, optimizer, generator, epochs: int, desc: str) -> tuple:
    """(step, tokens, train_seconds, first_epoch) to continue from: after the last epoch checkpoint in checkpoint_dir,
    whose weights, optimizer and RNG states are loaded; (0, 0, 0.0, 1) when there is none."""
    latest = latest_checkpoint(checkpoint_dir)
    if latest is None:
        return 0, 0, 0.0, 1
    state = load_epoch_checkpoint(latest, model, optimizer, generator)
    tqdm.write(f"{desc}: resumed after epoch {state['epoch']} (step {state['step']}) from {latest}")
    first_epoch = epochs + 1 if state["stopped"] else state["epoch"] + 1
    return state["step"], state["tokens"], state["train_seconds"], first_epoch


def check_finite(loss, desc: str, epoch: int, step: int, bar):
    """The NaN guard of train(): a loss that is nan or inf stops the run (exit 3) before anything is written."""
    if not torch.isfinite(loss):
        bar.close()  # so that the message starts a line of its own
        raise FloatingPointError(f"{desc}: the loss became {loss.item()} at epoch {epoch}, step {step}; "
                                 f"lower the learning rate (--lr / --stage1_lr / --pretrain_lr)")


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    found = sorted(checkpoint_dir.glob("epoch-*")) if checkpoint_dir is not None else []
    return found[-1] if found else None


def read_checkpoint_state(checkpoint_dir: Path | None) -> dict | None:
    latest = latest_checkpoint(checkpoint_dir)
    return json.loads((latest / "state.json").read_text()) if latest is not None else None


def load_epoch_checkpoint(path: Path, model, optimizer, generator) -> dict:
    from safetensors.torch import load_model

    device = next(model.parameters()).device
    if not load_sharded_state(path, model, optimizer):  # a DCP checkpoint of FSDP2 (§16)
        load_model(model, path / "model.safetensors", device=str(device))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state = json.loads((path / "state.json").read_text())
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state


def finished_result(checkpoint_dir: Path | None, name: str) -> dict | None:
    """--resume: the result of a method that finished before the kill, or None."""
    if checkpoint_dir is None or not (checkpoint_dir / "result.json").is_file():
        return None
    tqdm.write(f"{name}: resumed the finished result from {checkpoint_dir}")
    drop_epoch_checkpoints(checkpoint_dir)  # one a kill left beside the result
    return json.loads((checkpoint_dir / "result.json").read_text())


def save_finished_result(checkpoint_dir: Path | None, result: dict):
    if checkpoint_dir is not None:
        write_json_atomic(checkpoint_dir / "result.json", result)
        drop_epoch_checkpoints(checkpoint_dir)


def saves_epoch_checkpoints_here(checkpoint_dir: Path | None, student, cfg: Config, name: str) -> bool:
    """Whether this method's student is checkpointed after every epoch (said when auto decides against it)."""
    every_epoch = checkpoint_dir is not None and saves_epoch_checkpoints(student, cfg)
    if checkpoint_dir is not None and not every_epoch and cfg.epoch_checkpoints == "auto":
        tqdm.write(f"{name}: no epoch checkpoints ({epoch_checkpoint_bytes(student) / 1e9:.3g} GB each, over "
                   f"--epoch_checkpoint_max_mb); a killed run restarts this method from the teacher")
    return every_epoch


def drop_epoch_checkpoints(checkpoint_dir: Path):
    for old in checkpoint_dir.glob("epoch-*") if is_main_rank() else ():
        shutil.rmtree(old)


def output_folders(cfg: Config) -> dict[str, Path]:
    if cfg.sweep:
        return {run.folder: run_root(cfg) / run.folder for run in sweep_runs(cfg)}
    root = Path(cfg.out or default_out(cfg))
    if cfg.method == "all":
        return {run_name(m, t): root / run_name(m, t) for m, t in ALL_RUNS}
    return {run_name(cfg.method, cfg.trainable if cfg.method == "freeze" else None): root}


def run_root(cfg: Config) -> Path:
    """The folder that holds a run (or a run per method / swept value) and its checkpoints/."""
    return Path(cfg.out or default_out(cfg))


def default_out(cfg: Config) -> str:
    """The output folder when --out is empty: runs/<preset>/<what>-seed<seed> (or -seeds with --seeds)."""
    what = f"experiment-{cfg.experiment}" if cfg.experiment else \
        f"sweep-{'+'.join(name for name, _ in parse_sweep(cfg.sweep))}" if cfg.sweep else cfg.method
    return f"runs/{cfg.preset}/{what}-" + ("seeds" if cfg.seeds else f"seed{cfg.seed}")


def holds_a_run(folder: Path, cfg: Config) -> bool:
    """Whether a default folder is taken: anything in it (with --seeds: a finished report, so unfinished seeds go on)."""
    if cfg.seeds:
        return (folder / "seeds.md").exists() or (folder / "experiments-seeds.md").exists()
    return folder.is_dir() and any(folder.iterdir())


def with_fresh_default_out(cfg: Config) -> Config:
    """Running the same command twice works: a default folder that holds a run gets a fresh sibling, as Lightning's
    version_N; an explicit --out is never replaced (it is refused later unless --overwrite), nor is one to --resume."""
    if cfg.out or cfg.resume or cfg.overwrite or cfg.audit or cfg.screen:
        return cfg
    default = Path(default_out(cfg))
    if not holds_a_run(default, cfg):
        return cfg
    fresh = next(f"{default}-{n}" for n in range(2, 10**6) if not Path(f"{default}-{n}").exists())
    print(f"{default} holds an earlier run; this one writes to {fresh}")
    return replace(cfg, out=fresh)


# Flags that may differ between a killed run and its --resume.
RESUME_FREE = ("resume", "overwrite", "keep_checkpoints", "out", "epoch_checkpoints", "epoch_checkpoint_max_mb")


def check_output(cfg: Config, folders: dict[str, Path], checkpoints: Path):
    """Refuse an --out that holds another run's results (unless --overwrite) or a killed run's checkpoints (unless
    --resume or --overwrite); with --resume, insist on the killed run's flags. --overwrite deletes old checkpoints
    now, but old results stay until the new ones replace them, so a failed run destroys nothing."""
    for path in (checkpoints.parent, *folders.values()):
        if path.exists() and not path.is_dir():
            raise UserError(f"--out: {path} exists and is not a folder; choose another --out")
    finished = [f for f in folders.values() if (f / "results.json").exists()]
    saved = checkpoints / "teacher" / "config.json"
    for partial in [*checkpoints.glob(".*.tmp-*"), *checkpoints.glob("*/.*.tmp-*")] if cfg.resume and is_main_rank() else ():
        shutil.rmtree(partial)  # a checkpoint whose writing a kill cut short: never resumable, possibly tens of GB
    if cfg.resume and saved.is_file():
        theirs, ours = json.loads(saved.read_text()), asdict(cfg)
        differ = [k for k in ours if k not in RESUME_FREE and k in theirs and theirs[k] != ours[k]]
        if differ:
            raise UserError("--resume needs the flags of the killed run; " + ", ".join(f"--{k} was {theirs[k]!r}, now {ours[k]!r}" for k in differ)
                            + "; pass them as before, or --overwrite to start over")
        print(f"resuming the run in {checkpoints.parent} from {checkpoints}")
    elif cfg.resume and finished:
        raise UserError(f"{finished[0]} holds a finished run and no checkpoints to resume; pass --overwrite to run it again")
    elif cfg.resume:
        print(f"--resume: no checkpoint in {checkpoints} yet; starting from the beginning")
    elif finished and not cfg.overwrite:
        raise UserError(f"{finished[0]} already holds a run's results; pass --overwrite or choose another --out")
    elif checkpoints.exists() and not cfg.overwrite:
        raise UserError(f"{checkpoints.parent} holds the checkpoints of an unfinished run; pass --resume to continue it "
                        f"or --overwrite to start over")
    if cfg.overwrite and checkpoints.exists() and is_main_rank():
        shutil.rmtree(checkpoints)
    barrier()  # under torchrun: every rank has checked the folder before rank 0 writes to it (§16)


def drop_checkpoints(checkpoints: Path, cfg: Config):
    """A finished run needs no checkpoints, unless --keep_checkpoints."""
    if checkpoints.exists() and not cfg.keep_checkpoints and is_main_rank():
        shutil.rmtree(checkpoints)


# =====================================================================================================
# 12. Input checks: flags, devices, model folders, content fingerprints of the caches; SliCK against the world's truth
# =====================================================================================================
TEACHER_CACHES = ("auto", "hidden", "fp32", "bf16", "topk", "live")


def data_folder(cfg: Config) -> Path:
    """--data, which must exist, or data/world-<preset>, built here on first use (one command from a fresh clone)."""
    data_dir = Path(cfg.data or f"data/world-{cfg.preset}")
    if cfg.data and not data_dir.exists():  # a mistyped path must not quietly become a synthetic study
        raise UserError(f"--data {cfg.data} does not exist; build it with `python data_prep.py --preset {cfg.preset} --out {cfg.data}` "
                        f"or `python data_prep.py --source entityquestions --eq_dir PATH --out {cfg.data}`")
    with main_rank_first():  # under torchrun rank 0 builds it, the others then find it (§16)
        if not data_dir.exists():  # the default folder: one command from a fresh clone to a result
            print(f"no data in {data_dir}: building the synthetic world (python data_prep.py --preset {cfg.preset} --out {data_dir})")
            build_preset_world(cfg.preset, data_dir)
    return data_dir


def build_preset_world(preset: str, out: Path):
    data_prep.build_world(data_prep.WorldConfig(**{**data_prep.WORLD_PRESETS.get(preset, {}), "preset": preset, "out": str(out)}))


def check_config(cfg: Config):
    if cfg.method not in METHODS + ("all",):
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS + ('all',))}")
    # Chained comparisons are False for nan, so nan and inf fail too.
    for name in ("kl_weight", "l2_weight", "warmup_frac"):
        if not (0 <= getattr(cfg, name) < math.inf):
            raise UserError(f"--{name} {getattr(cfg, name)} is out of range; pass a finite number >= 0")
    for name in ("temperature", "slick_temperature", "lr", "stage1_lr", "pretrain_lr", "grad_clip"):
        if not (0 < getattr(cfg, name) < math.inf):
            raise UserError(f"--{name} {getattr(cfg, name)} is out of range; pass a finite number > 0")
    if cfg.warmup_frac >= 1:
        raise UserError(f"--warmup_frac {cfg.warmup_frac} leaves no steps after warm-up; pass a fraction below 1, e.g. 0.05")
    for name in ("n_known", "n_unknown", "n_held", "n_val", "slick_samples", "slick_top_k", "slick_max_facts"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} {getattr(cfg, name)} is negative; pass a count >= 0 (0 means all, for split sizes)")
    if cfg.resume and cfg.overwrite:
        raise UserError("--resume continues the run in --out and --overwrite starts it over; pass one of them")
    if cfg.resume and cfg.experiment:
        raise UserError("--resume works for --method and --sweep runs, not for --experiment; run the experiment again")
    if cfg.epoch_checkpoints not in EPOCH_CHECKPOINTS or cfg.epoch_checkpoint_max_mb < 0:
        raise UserError(f"--epoch_checkpoints must be one of {', '.join(EPOCH_CHECKPOINTS)} and --epoch_checkpoint_max_mb >= 0")
    if cfg.teacher_cache not in TEACHER_CACHES:
        raise UserError(f"unknown --teacher_cache {cfg.teacher_cache!r}; choose one of {', '.join(TEACHER_CACHES)}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {cfg.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if cfg.teacher_topk < 1 or cfg.kl_chunk < 0:
        raise UserError("--teacher_topk must be >= 1 and --kl_chunk >= 0")
    if cfg.kl_chunk == 0 and cfg.teacher_cache != "live":
        raise UserError("--kl_chunk 0 (the plain Eq. 1-2 function) takes the teacher's logits: use it with --teacher_cache live")
    if cfg.teacher_cache_max_mb < 0:
        raise UserError("--teacher_cache_max_mb must be >= 0")
    for name in ("epochs", "stage1_epochs", "batch_size", "slick_prompts", "slick_shots", "eval_max", "eval_batch_size",
                 "stage1_patience", "n_layer", "n_embd", "n_head", "mlp_ratio", "pretrain_epochs", "pretrain_batch_size", "pretrain_block"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if cfg.arch not in ("llama", "gpt2"):
        raise UserError(f"unknown --arch {cfg.arch!r}; choose llama or gpt2")
    if not cfg.model and cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd {cfg.n_embd} is not divisible by --n_head {cfg.n_head}; pick a width that is a multiple of the heads")
    if not cfg.model and (cfg.n_kv_head < 0 or cfg.n_kv_head and cfg.n_head % cfg.n_kv_head):
        raise UserError(f"--n_kv_head {cfg.n_kv_head} does not divide --n_head {cfg.n_head}; pass a divisor of the heads, or 0 for one per head")
    if cfg.seeds:
        parse_seeds(cfg.seeds)
        if cfg.sweep or cfg.resume:
            raise UserError("--seeds repeats --method or --experiment runs; it cannot be combined with --sweep or --resume")
    if cfg.sweep:
        parse_sweep(cfg.sweep)  # raises UserError on a malformed --sweep, before any work
    if cfg.experiment:
        experiment_plan(cfg)  # raises UserError on a malformed --experiment / --exp_counts / --exp_widths
    check_practitioner_config(cfg)
    check_spread(cfg)  # what runs under torchrun (§16)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0..); pick one of them")
    return rank_device(device)  # under torchrun: cuda:LOCAL_RANK (§16)


def load_local_model(cfg: Config):
    """(model, tokenizer, path) of --model: a local decoder-only Hugging Face folder, checked before and while loading
    (no foreign code unless --trust_remote_code, no pickled weights unless --allow_pickle)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(cfg.model)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(f"--model {cfg.model} is not a folder with a config.json; pass a local Hugging Face model folder")
    remote = dict(trust_remote_code=cfg.trust_remote_code)  # off unless asked: loading must not run foreign code
    try:
        config = AutoConfig.from_pretrained(path, **remote)
    except (ValueError, OSError) as e:
        hint = " (it ships its own code: pass --trust_remote_code if you trust it)" if "trust_remote_code" in str(e) else ""
        raise UserError(f"--model {cfg.model} has an unreadable config.json ({str(e).splitlines()[0]}){hint}") from None
    # Only decoder-only LMs answer by continuing the prompt; a BERT would even load (as BertLMHeadModel).
    architectures = config.architectures or []
    if config.is_encoder_decoder or (architectures and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)):
        raise UserError(f"--model {cfg.model} is a {', '.join(architectures) or config.model_type}, not a causal LM; "
                        f"pass a decoder-only model such as GPT-2, Llama or Qwen2")
    if not any(path.glob("*.safetensors")) and any(path.glob("pytorch_model*.bin")) and not cfg.allow_pickle:
        raise UserError(f"--model {cfg.model} has only pickled weights (pytorch_model*.bin), which unpickling can run code from; "
                        f"convert them to safetensors or pass --allow_pickle if you trust them")
    try:  # weights: safetensors only, unless asked; transformers reads a .bin with torch.load(weights_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=None if cfg.allow_pickle else True, **remote)
    except (ValueError, OSError) as e:
        raise UserError(f"--model {cfg.model} could not be loaded as a causal LM ({str(e).splitlines()[0]})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **remote)
    except (ValueError, OSError) as e:
        raise UserError(f"--model {cfg.model} has no usable tokenizer ({str(e).splitlines()[0]}); save one with tokenizer.save_pretrained") from None
    return model, tokenizer, path


def check_loaded_model(model, tokenizer, cfg: Config, device: torch.device):
    """The base model and its tokenizer can run the study: an end-of-text token, embeddings for every token, each
    --trainable pattern matching a parameter, a dtype the device computes in."""
    if tokenizer.eos_token is None:
        raise UserError(f"the tokenizer of --model {cfg.model} has no end-of-text token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token is None:  # many LLM tokenizers have none; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"--model {cfg.model}: its tokenizer has {len(tokenizer)} tokens but the model only "
                        f"{model.get_input_embeddings().num_embeddings} embeddings; pass the tokenizer saved with this model")
    # A --trainable pattern that matches no parameter fails now rather than after stage 1 (set_trainable raises).
    for method, trainable in ALL_RUNS if cfg.method == "all" else ((cfg.method, cfg.trainable),):
        if method == "freeze":
            set_trainable(model, trainable)
    set_trainable(model, "all")
    check_runnable_dtype(model, device, cfg.model)


def check_runnable_dtype(model, device: torch.device, name: str):
    """A checkpoint stored in a dtype this device cannot compute in (float8 anywhere; bfloat16 on a GPU without it)
    would fail deep inside generation: one line now instead."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    float8 = sorted(str(d) for d in dtypes if "float8" in str(d))
    if float8:
        raise UserError(f"--model {name} is stored in {', '.join(float8)}, which sftguard cannot train or run; "
                        f"pass a bfloat16 or float32 copy (model.to(torch.bfloat16).save_pretrained(...))")
    if torch.bfloat16 in dtypes and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--model {name} is stored in bfloat16, which this GPU cannot compute in; pass a float16 or "
                        f"float32 copy (model.to(torch.float16).save_pretrained(...)) and --precision fp16")


def base_model_key(cfg: Config, world: dict) -> str:
    spec = {k: getattr(cfg, k) for k in ("arch", "n_layer", "n_embd", "n_head", "mlp_ratio", "vocab_size",
                                         "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "pretrain_block")}
    if cfg.n_kv_head not in (0, cfg.n_head):  # only then a different model (older caches keep their keys)
        spec["n_kv_head"] = cfg.n_kv_head
    spec["world"] = world["fingerprint"]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def stop_token_ids(tokenizer) -> list[int]:
    """An answer ends at end-of-text or at the first token holding a newline (few-shot prompts go on)."""
    if not hasattr(tokenizer, "_sftguard_stop_ids"):
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        tokenizer._sftguard_stop_ids = [tokenizer.eos_token_id] + [i for i, p in enumerate(pieces) if "\n" in p]
    return tokenizer._sftguard_stop_ids


def file_sha256(path: Path, cache_dir: Path) -> str:
    """sha256 of a file's bytes, remembered under its path, size, mtime, ctime and inode, so that a multi-GB weight file
    is read once per version. Every write or rename sets ctime, which cannot be set back: a rewrite is always seen."""
    st = path.stat()
    stamp = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    memo = cache_dir / "file-sha256" / f"{hashlib.sha256(stamp.encode()).hexdigest()[:24]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    write_text_atomic(memo, digest)
    return digest


def model_fingerprint(folder: Path, cache_dir: Path) -> str:
    """The content of a model folder: config, tokenizer and weight files (not the docs), whatever its path."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")
    return hashlib.sha256(json.dumps([[p.name, file_sha256(p, cache_dir)] for p in files]).encode()).hexdigest()


def cached_categories(model, tokenizer, facts, cfg: Config, model_path: Path) -> dict[str, str]:
    """SliCK categories describe the base model, so they are computed once per (model, facts, SliCK setting)."""
    path = Path(cfg.cache_dir) / categories_cache_name(model, facts, cfg, model_path)
    if path.is_file():
        return json.loads(path.read_text())
    seed_everything(0)
    categories = categorize_facts(model, tokenizer, facts, cfg, random.Random(0))
    write_json_atomic(path, categories)
    return categories


# The synthetic world knows which facts were in pretraining: results.json reports how well SliCK finds them.
def slick_vs_truth(facts: list[dict], categories: dict[str, str]) -> dict | None:
    """The synthetic world knows which facts were in pretraining: how well do the categories agree?"""
    scored = [f for f in facts if f["id"] in categories and f.get("in_pretraining") is not None]
    if not scored:
        return None
    table = {c: {"in_pretraining": 0, "not_in_pretraining": 0} for c in CATEGORIES}
    for f in scored:
        table[categories[f["id"]]]["in_pretraining" if f["in_pretraining"] else "not_in_pretraining"] += 1
    agree = sum((categories[f["id"]] != "Unknown") == bool(f["in_pretraining"]) for f in scored)
    return {"table": table, "agreement": agree / len(scored)}


def categories_cache_name(model, facts, cfg: Config, model_path: Path) -> str:
    """slick-<hash>.json, keyed by content: the model folder's files and the dtype / device it runs in, the facts' text,
    the SliCK settings."""
    spec = json.dumps({"model": model_fingerprint(model_path, Path(cfg.cache_dir)),
                       "runs_on": [str(model.dtype), model.device.type],
                       "facts": [[f[k] for k in ("id", "relation", "subject", "question", "answers")] for f in facts],
                       "slick": [cfg.slick_prompts, cfg.slick_shots, cfg.slick_samples, cfg.slick_temperature, cfg.slick_top_k,
                                 cfg.eval_batch_size]})  # the batch decides which random numbers each prompt's samples get
    return f"slick-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.json"


# --- The shipped default base model: a fresh clone's first run skips pretraining and SliCK (README: The first run) ---
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"  # key.json, base-<key>/ and slick-<hash>.json, as in --cache_dir
# The source of these functions decides the pretrained base model and its SliCK categories, given the world and config.
SHIPPED_CODE = ("seed_everything", "train_tokenizer", "make_model_config", "pretrain_base_model", "next_token_loss", "get_lr",
                "train", "answer_logits", "output_layer_separable", "sparse_tied_embedding_gradient", "resolve_precision",
                "Precision", "base_model_key", "category_pool", "categorize_facts", "slick_category", "few_shot_prompt",
                "generate_answers", "max_answer_tokens", "is_correct", "normalize_answer", "stop_token_ids", "cached_categories",
                "categories_cache_name")
SHIP_COMMAND = "python -c 'import sftguard; sftguard.ship_base_model()'"


def shipped_key(cfg: Config, world: dict) -> str:
    """What shipped files must come from: the base model's cache key (world fingerprint, pretraining config) and the
    source of SHIPPED_CODE, so that files made by older code are never used."""
    import inspect
    source = "".join(inspect.getsource(globals()[name]) for name in SHIPPED_CODE)
    return f"{base_model_key(cfg, world)}-{hashlib.sha256(source.encode()).hexdigest()[:16]}"


def restore_shipped_base_model(cfg: Config, world: dict, cache: Path, shipped: Path | None = None) -> bool:
    """Copy the shipped base model and its SliCK categories into --cache_dir if they were made by this code from this
    world and config (shipped/key.json); False otherwise, and the caller pretrains."""
    shipped = shipped or SHIPPED_DIR
    key_file = shipped / "key.json"
    if not key_file.is_file() or json.loads(key_file.read_text())["key"] != shipped_key(cfg, world):
        return False
    if not (shipped / cache.name / "config.json").is_file():
        return False
    save_folder_atomic(cache, lambda tmp: shutil.copytree(shipped / cache.name, tmp, dirs_exist_ok=True))
    for categories in shipped.glob("slick-*.json"):  # named by the hash cached_categories looks up
        if not (Path(cfg.cache_dir) / categories.name).exists():
            shutil.copyfile(categories, Path(cfg.cache_dir) / categories.name)
    print(f"using the base model and SliCK categories shipped in {shipped} (made by this code from this world)")
    return True


def ship_base_model(preset: str = "default", shipped: Path | None = None) -> Path:
    """Regenerate shipped/ from scratch: build the preset's world, pretrain its base model and categorise its facts on
    the CPU in a fresh cache (as a fresh clone's first run would), then copy both there with their key (minutes)."""
    shipped = shipped or SHIPPED_DIR
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(["--preset", preset, "--device", "cpu", "--cache_dir", tmp, "--data", str(Path(tmp) / "world")])
        build_preset_world(preset, Path(cfg.data))  # fresh, from the current data_prep.py
        facts, world = load_facts(Path(cfg.data))
        if shipped.exists():
            shutil.rmtree(shipped)  # else pretraining would restore the old files
        model, tokenizer, path = load_base_model(cfg, Path(cfg.data), world, torch.device("cpu"))
        cached_categories(model, tokenizer, category_pool(facts, cfg), cfg, path)
        shipped.mkdir(parents=True)
        shutil.copytree(path, shipped / path.name)
        for categories in Path(tmp).glob("slick-*.json"):
            shutil.copyfile(categories, shipped / categories.name)
        write_json_atomic(shipped / "key.json", {"key": shipped_key(cfg, world), "preset": preset, "torch": torch.__version__,
                                                 "regenerate": SHIP_COMMAND})
    return shipped


# =====================================================================================================
# 13. Repeated runs: --sweep (the stability-plasticity frontier) and --seeds (mean and sd over seeds)
# =====================================================================================================
# --sweep: the stability-plasticity frontier. Each swept field belongs to the method it changes.
SWEEPABLE = {"kl_weight": "selfdistill", "temperature": "selfdistill", "l2_weight": "l2"}
EQUAL_ACQUISITION = 0.9  # the new-fact accuracy at which a sweep's methods are compared (the paper's ~94.6% is above it)


def parse_sweep(spec: str) -> list[tuple[str, list[float]]]:
    """'kl_weight=0,0.25,1' -> [('kl_weight', [0.0, 0.25, 1.0])]; fields joined by ';' are swept from the same teacher
    ('kl_weight=0.25,2;l2_weight=0.01,0.1')."""
    fields = [parse_sweep_field(part) for part in spec.split(";") if part.strip()]
    if not fields or len({name for name, _ in fields}) != len(fields):
        raise UserError(f"--sweep {spec!r}: write NAME=v1,v2,... (several joined by ';', each NAME once), e.g. kl_weight=0.25,1,4")
    return fields


def parse_sweep_field(spec: str) -> tuple[str, list[float]]:
    """'kl_weight=0,0.25,1' -> ('kl_weight', [0.0, 0.25, 1.0])."""
    name, _, values = (s.strip() for s in spec.partition("="))
    if name not in SWEEPABLE or not values:
        raise UserError(f"--sweep {spec!r}: write NAME=v1,v2,... with NAME one of {', '.join(SWEEPABLE)}, e.g. kl_weight=0,0.25,1,4,16")
    try:
        numbers = [float(v) for v in values.split(",")]
    except ValueError:
        raise UserError(f"--sweep {spec!r}: the values must be numbers separated by commas, e.g. {name}=0,1,4") from None
    if len(set(numbers)) != len(numbers):
        raise UserError(f"--sweep {spec!r} repeats a value; list each value once")
    if any(v < 0 or not math.isfinite(v) for v in numbers) or (name == "temperature" and min(numbers) <= 0):
        raise UserError(f"--sweep {spec!r}: {name} values must be finite and {'> 0' if name == 'temperature' else '>= 0'}")
    return name, numbers


@dataclass
class SweepRun:
    """One run of a sweep: its folder, method, the swept field and value (None for a control), its config."""
    folder: str
    method: str
    field: str | None
    value: float | None
    cfg: Config


def sweep_runs(cfg: Config) -> list[SweepRun]:
    """Every run of a sweep: each value of each field, then the controls at their configured settings: known_only, sft,
    the regulariser not swept, and with l2_weight swept L2 at the weights matched to self-distillation's KL gradient
    (over the whole run, and over epoch 1 alone; run_sweep fills them in), probed on the self-distillation run at the
    configured lambda and tau (a swept one, or a control)."""
    fields = parse_sweep(cfg.sweep)
    runs = [SweepRun(f"{SWEEPABLE[name]}-{name}{v:g}", SWEEPABLE[name], name, v, replace(cfg, **{name: v}))
            for name, values in fields for v in values]
    swept = {name for name, _ in fields}
    controls = ["known_only", "sft"]
    if not swept & {"kl_weight", "temperature"} or ("l2_weight" in swept and not any(map(is_default_selfdistill(cfg), runs))):
        controls.append("selfdistill")
    controls += ["l2-matched", "l2-matched-epoch1"] if "l2_weight" in swept else ["l2"]
    return runs + [SweepRun(c, c.split("-")[0], None, None, cfg) for c in controls]


def is_default_selfdistill(cfg: Config):
    """Whether a sweep's run is self-distillation at cfg's lambda and tau (the run that probes the KL gradient)."""
    return lambda run: run.method == "selfdistill" and (run.cfg.kl_weight, run.cfg.temperature) == (cfg.kl_weight, cfg.temperature)


def run_sweep(teacher, tokenizer, splits, eval_sets, teacher_scores, common: dict, cfg: Config, folders: dict,
              checkpoints: Path | None = None) -> dict:
    """Stage 2 once per swept value and once per control, every run from the same teacher; then the frontier."""
    runs = sweep_runs(cfg)
    probed = next((r.folder for r in runs if is_default_selfdistill(cfg)(r)), None) if "l2-matched" in {r.folder for r in runs} else None
    probe, matched = {"kl_grad_norm": [], "distance": [], "step": []}, {}
    steps_per_epoch = math.ceil((len(splits["known"]) + len(splits["unknown"])) / cfg.batch_size)
    every = max(1, min(4, steps_per_epoch // 4))  # at least 4 probe steps in epoch 1, the first at distance 0
    results = []
    for run in runs:
        run_cfg, is_probe = run.cfg, run.folder == probed
        if run.folder.startswith("l2-matched"):  # the weight the probe measured
            run_cfg = replace(run_cfg, l2_weight=matched["l2_weight_epoch1" if run.folder.endswith("epoch1") else "l2_weight"])
        result = run_method(run.method, None, teacher, tokenizer, splits, eval_sets, teacher_scores, run_cfg,
                            # the probe always runs whole (a resumed half would measure half a trajectory)
                            checkpoint_dir=checkpoints / run.folder if checkpoints is not None and not is_probe else None,
                            save_to=folders[run.folder] / "model" if cfg.save_model else None,
                            make_loss=(lambda m, student, t, c, b: kl_gradient_probe(student, t, c, probe, every)) if is_probe else None)
        if is_probe:
            matched = matched_l2_weights(probe, steps_per_epoch)
            result = {**result, "l2_probe": matched}
        results.append({**result, **common, "run": run.folder, "sweep_field": run.field, "sweep_value": run.value,
                        "l2_weight": run_cfg.l2_weight if run.method == "l2" else None})
        run.cfg = run_cfg
    control = next(r for r in results if r["method"] == "known_only")
    for result, run in zip(results, runs):
        result["excess_forgetting"] = excess_forgetting(result, control)
        write_results(folders[run.folder], result, run.cfg)
    write_sweep_report(run_root(cfg), results, teacher_scores, cfg)
    return {"results": results, "teacher": teacher_scores}


SWEEP_SYMBOL = {"kl_weight": "λ", "temperature": "τ", "l2_weight": "α"}


def sweep_table(results: list[dict]) -> str:
    """One row per run of a sweep: the swept value, the three accuracies, forgetting."""
    lines = ["| run | swept value | D_known (task) | D_unknown (new) | D_held (held-out) | forgetting | excess over known_only |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        new = None if r["method"] == "known_only" else r["final"]["unknown_acc"]
        value = (f"{SWEEP_SYMBOL[r['sweep_field']]}={r['sweep_value']:g}" if r.get("sweep_field") else
                 f"α={r['l2_weight']:.3g}" if r.get("l2_weight") is not None else "–")
        lines.append(f"| {r['run']} | {value} | {pct(r['final']['known_acc'])} | {pct(new)} | {pct(r['final']['held_acc'])} | "
                     f"{pct(r['forgetting'])} | {pct(r['excess_forgetting'])} |")
    return "\n".join(lines) + "\n"


def frontier_forgetting_at(points: list[tuple[float, float]], target: float) -> float | None:
    """Forgetting on a sweep's frontier at new-fact accuracy `target`, linear between the two runs next to each other in
    new-fact accuracy that bracket it; None outside the runs' range. points: (new-fact accuracy, forgetting) per run."""
    points = sorted(points)
    exact = [f for acc, f in points if acc == target]
    if exact:
        return exact[0]
    for (a0, f0), (a1, f1) in zip(points, points[1:]):
        if a0 < target < a1:
            return f0 + (target - a0) / (a1 - a0) * (f1 - f0)
    return None


def equal_acquisition_table(results: list[dict], target: float = EQUAL_ACQUISITION) -> str:
    """Each method's forgetting at new-fact accuracy `target`: on each swept field's frontier (final values, interpolated
    between swept values; the method's controls are points of it too, at their weights), and along each run's own curve
    (interpolated between epochs; a sweep's best run)."""
    lines = [f"At equal acquisition: forgetting % where new-fact accuracy is {pct(target)}%. Frontier: between the swept "
             "values whose final new-fact accuracies bracket it. Curve: where the run's own new-fact accuracy first reached "
             "it, between epochs (for a sweep, its lowest run).", "",
             "| method | runs | final new-fact acc | forgetting on the frontier | forgetting on the curve (epoch) |", "|---|---|---|---|---|"]
    fields = list(dict.fromkeys(r["sweep_field"] for r in results if r.get("sweep_field")))
    groups = [(f"{SWEEPABLE[f]}, {SWEEP_SYMBOL[f]} swept", [r for r in results if r.get("sweep_field") == f or
                                                           (not r.get("sweep_field") and r["method"] == SWEEPABLE[f])]) for f in fields]
    groups += [(r["run"] + (f" (α={r['l2_weight']:.3g})" if r["method"] == "l2" else ""), [r]) for r in results
               if not r.get("sweep_field") and r["method"] != "known_only"]
    for label, runs in groups:
        frontier = frontier_forgetting_at([(r["final"]["unknown_acc"], r["forgetting"]) for r in runs], target) if len(runs) > 1 else None
        on_curve = [(curve_forgetting_at(r["curve"], target, "unknown_acc"), r) for r in runs]
        on_curve = [(f, r) for f, r in on_curve if not math.isnan(f)]
        best = min(on_curve, key=lambda x: x[0], default=None)
        curve_cell = "never reached" if best is None else f"{pct(best[0])} ({best[1]['run']}, epoch {reached_epoch(best[1]['curve'], target)})"
        finals = ", ".join(pct(r["final"]["unknown_acc"]) for r in runs)
        lines.append(f"| {label} | {len(runs)} | {finals} | {'–' if len(runs) == 1 else pct(frontier) if frontier is not None else 'outside the runs'} "
                     f"| {curve_cell} |")
    return "\n".join(lines) + "\n"


def rewrite_sweep_report(folder: str) -> Path:
    """sweep.md, sweep.json and frontier.png again from the results.json of every run of the sweep in folder (no
    training): python -c 'import sftguard; sftguard.rewrite_sweep_report("results/default-sweep-l2-vs-kl")'."""
    root = Path(folder)
    report = json.loads((root / "sweep.json").read_text())
    cfg = parse_config(["--sweep", report["sweep"], "--preset", report["preset"], "--seed", str(report["seed"]), "--out", folder])
    results = [json.loads((root / run.folder / "results.json").read_text()) for run in sweep_runs(cfg)]
    write_sweep_report(root, results, results[0]["teacher"], cfg)
    return root / "sweep.md"


def reached_epoch(curve: list[dict], target: float, key: str = "unknown_acc") -> int | None:
    """The first stage-2 epoch whose accuracy (key) reaches target."""
    return next((p["epoch"] for p in curve if p["epoch"] > 0 and p[key] >= target), None)


def plot_frontier(path: Path, results: list[dict], teacher_scores: dict, seed: int) -> bool:
    """frontier.png: held-out accuracy against new-fact accuracy, one line per swept field (a point per value), the
    controls marked. Returns False (and draws nothing) when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    fields = list(dict.fromkeys(r["sweep_field"] for r in results if r.get("sweep_field")))
    for i, name in enumerate(fields):
        swept = sorted((r for r in results if r.get("sweep_field") == name), key=lambda r: r["sweep_value"])
        xs, ys = [100 * r["final"]["unknown_acc"] for r in swept], [100 * r["final"]["held_acc"] for r in swept]
        symbol, color = SWEEP_SYMBOL.get(name, name), ("C0", "C2", "C4")[i % 3]
        ax.plot(xs, ys, "o-", color=color, zorder=3, label=f"{swept[0]['method']}, one point per {symbol}")
        for r, x, y in zip(swept, xs, ys):
            ax.annotate(f"{symbol}={r['sweep_value']:g}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
    style = {"sft": ("s", "C3", "plain SFT"), "known_only": ("v", "C7", "known_only (no new facts)"),
             "l2": ("D", "C2", "L2 pull to the teacher"), "selfdistill": ("^", "C1", "self-distillation (defaults)"),
             "l2-matched": ("P", "C8", "L2, gradient-matched α"), "l2-matched-epoch1": ("X", "C9", "L2, α matched on epoch 1")}
    for r in results:
        if not r.get("sweep_field"):
            marker, color, label = style.get(r["run"], style[r["method"]])
            if r["method"] == "l2":
                label += f" (α={r['l2_weight']:.3g})"
            ax.plot(100 * r["final"]["unknown_acc"], 100 * r["final"]["held_acc"], marker, color=color, ms=8, zorder=4, label=label)
    ax.plot(100 * teacher_scores["unknown_acc"], 100 * teacher_scores["held_acc"], "*", color="k", ms=11, zorder=4,
            label="teacher (before stage 2)")
    ax.axvline(100 * EQUAL_ACQUISITION, color="k", lw=0.6, ls=":")  # where the methods are compared
    ax.set_xlim(-3, 103)  # new-fact accuracy spans 0-100 across a sweep; a fixed axis compares seeds and classes
    ax.set_xlabel("new-fact accuracy, D_unknown (%)  → plasticity")
    ax.set_ylabel("held-out accuracy, D_held (%)  → stability")
    ax.set_title(f"Stability–plasticity frontier over {', '.join(SWEEP_SYMBOL.get(f, f) for f in fields)}, seed {seed}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_sweep_report(root: Path, results: list[dict], teacher_scores: dict, cfg: Config):
    """sweep.json (one point per run), sweep.md (the tables), frontier.png (when matplotlib is installed)."""
    fields = [name for name, _ in parse_sweep(cfg.sweep)]
    points = [{"run": r["run"], "method": r["method"], **{f: r["sweep_value"] if r.get("sweep_field") == f else None for f in fields},
               "l2_weight": r.get("l2_weight"), **r["final"], "forgetting": r["forgetting"], "excess_forgetting": r["excess_forgetting"]}
              for r in results]
    probe = next((r["l2_probe"] for r in results if "l2_probe" in r), None)
    plotted = plot_frontier(root / "frontier.png", results, teacher_scores, cfg.seed)
    note = "![frontier](frontier.png)\n" if plotted else "frontier.png skipped: matplotlib is not installed (pip install -r requirements.txt)\n"
    matched = "" if probe is None else (
        f"Gradient-matched L2 weight (README: gradient-matched L2): α = {probe['l2_weight']:.3g} over the self-distillation "
        f"run ({probe['steps']} probe steps), α = {probe['l2_weight_epoch1']:.3g} over its epoch 1 alone ({probe['steps_epoch1']} steps).\n\n")
    write_text_atomic(root / "sweep.md", f"# sftguard --sweep {cfg.sweep}, preset {cfg.preset}, seed {cfg.seed}\n\n"
                      f"Every run starts from the same teacher (D_known {pct(teacher_scores['known_acc'])}, D_unknown "
                      f"{pct(teacher_scores['unknown_acc'])}, D_held {pct(teacher_scores['held_acc'])}); accuracy % after "
                      f"{cfg.epochs} epochs of stage 2. Rows without a swept value are the controls at their configured settings.\n\n"
                      + sweep_table(results) + "\n" + matched + equal_acquisition_table(results) + "\n" + note
                      + "\n" + anatomy_report(results))  # Part II, §7c
    write_json_atomic(root / "sweep.json", {"sweep": cfg.sweep, "swept": fields[0] if len(fields) == 1 else fields, "seed": cfg.seed,
                                            "preset": cfg.preset, "teacher": teacher_scores, "l2_probe": probe, "points": points})
    print("\n" + sweep_table(results) + "\n" + matched + equal_acquisition_table(results))
    print(note.strip() if not plotted else f"frontier plot: {root / 'frontier.png'}")


def parse_seeds(spec: str) -> list[int]:
    try:
        seeds = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds {spec!r} is not a comma list of integers; write e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {spec!r} needs distinct integers, e.g. --seeds 0,1,2")
    return seeds


def matched_acquisition(result: dict, threshold: float = 0.9) -> dict | None:
    """Held-out accuracy at the first evaluation where new-fact accuracy reaches the threshold: methods
    compared at equal acquisition, not at an equal epoch."""
    for point in result["curve"]:
        if point["epoch"] > 0 and point["unknown_acc"] >= threshold:
            return {"epoch": point["epoch"], "held_acc": point["held_acc"],
                    "forgetting": relative_drop(result["teacher"]["held_acc"], point["held_acc"])}
    return None


def mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * sd:.1f}"


def seeds_markdown(per_seed: list[list[dict]], cfg: Config, seeds: list[int]) -> str:
    """Mean ± sd over seeds, laid out like Table 1, plus the matched-acquisition view."""
    names = [run_name(r["method"], r["trainable"]) for r in per_seed[0]]
    rows = {name: [next(r for r in runs if run_name(r["method"], r["trainable"]) == name) for runs in per_seed] for name in names}
    teacher = [runs[0]["teacher"] for runs in per_seed]
    lines = [f"# sftguard --method {cfg.method}, preset {cfg.preset}, seeds {', '.join(map(str, seeds))}", "",
             f"Teacher (after stage 1): D_known {mean_sd([t['known_acc'] for t in teacher])}, "
             f"D_unknown {mean_sd([t['unknown_acc'] for t in teacher])}, D_held {mean_sd([t['held_acc'] for t in teacher])}", "",
             f"Accuracy % after stage 2 ({cfg.epochs} epochs), mean ± sd over {len(seeds)} seeds. Forgetting: relative drop of "
             "D_held accuracy from the teacher; excess: minus the known_only control's forgetting of the same seed.", "",
             "| method | D_known (task) | D_unknown (new) | D_held (held-out) | forgetting | excess over known_only |",
             "|---|---|---|---|---|---|"]
    for name, rs in rows.items():
        new = "–" if rs[0]["method"] == "known_only" else mean_sd([r["final"]["unknown_acc"] for r in rs])
        lines.append(f"| {name} | {mean_sd([r['final']['known_acc'] for r in rs])} | {new} | {mean_sd([r['final']['held_acc'] for r in rs])} | "
                     f"{mean_sd([r['forgetting'] for r in rs])} | {mean_sd([r.get('excess_forgetting') for r in rs])} |")
    lines += ["", "Matched acquisition: D_held accuracy and forgetting at the first epoch where D_unknown accuracy reaches 90%.", "",
              "| method | seeds that reach 90% | epoch | D_held (held-out) | forgetting |", "|---|---|---|---|---|"]
    for name, rs in rows.items():
        if rs[0]["method"] == "known_only":
            continue
        matched = [m for m in map(matched_acquisition, rs) if m is not None]
        epochs = f"{statistics.mean(m['epoch'] for m in matched):.1f}" if matched else "–"
        lines.append(f"| {name} | {len(matched)}/{len(rs)} | {epochs} | {mean_sd([m['held_acc'] for m in matched])} | "
                     f"{mean_sd([m['forgetting'] for m in matched])} |")
    return "\n".join(lines) + "\n"


def plot_forgetting_curves(path: Path, per_seed: list[list[dict]], seeds: list[int]) -> bool:
    """forgetting.png: held-out and new-fact accuracy after every stage-2 epoch, one line per method, mean over
    seeds (band: ± sd). Returns False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (ax_held, ax_new) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, sharex=True)
    for i, runs in enumerate(zip(*per_seed)):  # one method, every seed
        name = run_name(runs[0]["method"], runs[0]["trainable"])
        epochs = [p["epoch"] for p in runs[0]["curve"]]
        for ax, key in ((ax_held, "held_acc"), (ax_new, "unknown_acc")):
            if key == "unknown_acc" and runs[0]["method"] == "known_only":
                continue
            values = torch.tensor([[100 * p[key] for p in r["curve"]] for r in runs])
            mean, sd = values.mean(0), values.std(0) if len(runs) > 1 else torch.zeros(len(epochs))
            ax.plot(epochs, mean, "o-", ms=3, color=f"C{i}", label=name)
            ax.fill_between(epochs, mean - sd, mean + sd, color=f"C{i}", alpha=0.15)
    ax_held.set_ylabel("held-out accuracy, D_held (%)  (its drop is forgetting)")
    ax_new.set_ylabel("new-fact accuracy, D_unknown (%)")
    for ax in (ax_held, ax_new):
        ax.set_xlabel("stage-2 epoch (0 = the teacher)")
        ax.grid(alpha=0.3)
    fig.legend(*ax_held.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)  # below both panels
    fig.suptitle(f"Forgetting over training, mean ± sd over seeds {', '.join(map(str, seeds))}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return True


def experiment_seeds_markdown(per_seed: list[dict], cfg: Config, seeds: list[int]) -> str:
    """Mean ± sd over seeds of every condition of every experiment, and the paper's findings checked on the means."""
    lines = [f"# sftguard --experiment {cfg.experiment}, preset {cfg.preset}, seeds {', '.join(map(str, seeds))}", "",
             f"Mean ± sd over {len(seeds)} seeds (each seed: its own split, teacher, new facts and training order); "
             "all numbers %. Per-seed tables: seed*/experiments.md.", ""]
    for name in per_seed[0]:
        rows = [res[name]["rows"] for res in per_seed]
        lines += [f"## {name}", "", "| condition | new facts | width | epochs | new-fact acc | D_held acc | forgetting | drift |",
                  "|---|---|---|---|---|---|---|---|"]
        order = sorted(range(len(rows[0])), key=lambda i: (rows[0][i]["method"] in ("known_only", "l2"), rows[0][i]["width"],
                                                          rows[0][i]["count"], str(rows[0][i]["key"]), rows[0][i]["method"] != "sft"))
        for i in order:
            r, same = rows[0][i], [seed_rows[i] for seed_rows in rows]  # the experiments run their conditions in a fixed order
            new = "–" if r["method"] == "known_only" else mean_sd([x["new_acc"] for x in same])
            epochs = "/".join(str(x["epochs"]) for x in same) if r.get("fit_target") is not None else str(r["epochs"])
            lines.append(f"| {r['condition']} | {r['count']} | {r['width']} | {epochs} | {new} | {mean_sd([x['held_acc'] for x in same])} | "
                         f"{mean_sd([x['forgetting'] for x in same])} | {mean_sd([x['drift'] for x in same])} |")
        if name == "interference":
            counts = per_seed[0][name]["counts"]
            means = InterferenceNumbers.mean([InterferenceNumbers.of(seed_rows, counts) for seed_rows in rows])
            lines += ["", anatomy_markdown("condition | new facts | held-out facts",
                                           interference_anatomy_rows(rows, per_seed[0][name]["relation"]))]
            lines += ["The paper's findings, checked on the means over seeds:", ""]
            lines += [f"- [{'x' if ok else ' '}] {claim}: {numbers}" for claim, ok, numbers in interference_checks(means)]
        lines.append("")
    return "\n".join(lines)


def run_experiment_seeds(cfg: Config, seeds: list[int]) -> dict:
    """--experiment X --seeds 0,1,2: the experiments once per seed into DIR/seed<N>/ (finished seeds are reused),
    then DIR/experiments-seeds.md with mean ± sd over seeds."""
    root = Path(cfg.out or default_out(cfg))
    names, _, _ = experiment_plan(cfg)
    per_seed = []
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed, seeds="", out=str(root / f"seed{seed}"))
        folder = Path(seed_cfg.out)
        if all((folder / f"{n}.json").is_file() for n in names) and not cfg.overwrite:
            print(f"seed {seed}: reusing the finished experiments in {folder}")
            per_seed.append({n: json.loads((folder / f"{n}.json").read_text()) for n in names})
        else:
            per_seed.append(run_experiments(seed_cfg))
    report = experiment_seeds_markdown(per_seed, cfg, seeds)
    write_text_atomic(root / "experiments-seeds.md", report)
    print("\n" + report + f"\nwritten to {root / 'experiments-seeds.md'}")
    return {"per_seed": per_seed}


def run_seeds(cfg: Config) -> dict:
    """--seeds 0,1,2: the same study once per seed (each from its own teacher), then mean ± sd of every method."""
    seeds = parse_seeds(cfg.seeds)
    if cfg.experiment:
        return run_experiment_seeds(cfg, seeds)
    root = Path(cfg.out or default_out(cfg))
    per_seed = []
    for seed in seeds:
        seed_cfg = replace(cfg, seed=seed, seeds="", out=str(root / f"seed{seed}"))
        folders = output_folders(seed_cfg)
        if all((f / "results.json").is_file() for f in folders.values()) and not cfg.overwrite:
            print(f"seed {seed}: reusing the finished run in {seed_cfg.out}")
        else:
            main(seed_cfg)
        per_seed.append([json.loads((f / "results.json").read_text()) for f in folders.values()])
    report = seeds_markdown(per_seed, cfg, seeds)
    report += "\n" + anatomy_report([list(runs) for runs in zip(*per_seed)], root,
                                     f"Where the forgetting comes from, mean ± sd over seeds {', '.join(map(str, seeds))}")
    plotted = plot_forgetting_curves(root / "forgetting.png", per_seed, seeds)
    report += ("\n![forgetting over training](forgetting.png)\n" if plotted else
               "\nforgetting.png skipped: matplotlib is not installed (pip install -r requirements.txt)\n")
    write_text_atomic(root / "seeds.md", report)
    print("\n" + report + f"\nwritten to {root / 'seeds.md'}")
    return {"per_seed": per_seed}


# =====================================================================================================
# 14. Practitioners' tools: audit a fine-tune for forgetting, screen an SFT set, the paper's loss in a Trainer
# =====================================================================================================
# The study above asks the paper's question on its own runs. These tools ask it of any two checkpoints of one
# tokenizer (--audit: did my fine-tune damage what the base knew?), of a QA set before training (--screen: how many
# examples teach facts the model does not know?), and bring the fix to transformers' Trainer (SelfDistillationLoss).
def check_practitioner_config(cfg: Config):
    if cfg.audit and cfg.screen:
        raise UserError("--audit and --screen are two tools; pass one of them")
    if (cfg.audit or cfg.screen) and not (cfg.model and cfg.data):
        what = f"--audit {cfg.audit}" if cfg.audit else "--screen"
        raise UserError(f"{what} needs --model BASE (the model before fine-tuning) and --data DIR (a data_prep folder)")
    if cfg.audit_facts and not cfg.audit:
        raise UserError("--audit_facts restricts an audit: pass it with --audit FINETUNED")
    if (cfg.audit or cfg.screen) and (cfg.experiment or cfg.sweep or cfg.seeds or cfg.resume):
        raise UserError("--audit and --screen run alone; drop --experiment, --sweep, --seeds and --resume")
    if cfg.audit_examples < 0:
        raise UserError("--audit_examples must be >= 0")


# --- --audit: the base model against its fine-tune ---------------------------------------------------------
def load_finetuned(cfg: Config, base, base_tokenizer, data_dir: Path, world: dict, device: torch.device):
    """The model under audit: a Hugging Face folder, or a PEFT adapter merged into a copy of the base model."""
    path = Path(cfg.audit)
    if (path / "adapter_config.json").is_file():
        try:
            from peft import PeftModel
        except ImportError:
            raise UserError(f"--audit {path} is a PEFT adapter and peft is not installed; "
                            f"pip install -r requirements-extras.txt (or pip install peft)") from None
        model = PeftModel.from_pretrained(copy.deepcopy(base), path).merge_and_unload()
        from transformers import AutoTokenizer

        has_tokenizer = any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
        return model.eval(), AutoTokenizer.from_pretrained(path) if has_tokenizer else base_tokenizer
    try:
        model, tokenizer, _ = load_base_model(replace(cfg, model=str(path), method="sft"), data_dir, world, device)
    except UserError as e:  # the same checks as for --model, named after the flag the user gave
        raise UserError(str(e).replace(f"--model {path}", f"--audit {path}")) from None
    return model.eval(), tokenizer


def check_comparable(cfg: Config, base, base_tokenizer, tuned, tuned_tokenizer):
    """An audit compares two checkpoints of one model: one tokenizer, one architecture and parameter shapes."""
    if base_tokenizer.get_vocab() != tuned_tokenizer.get_vocab() or base_tokenizer.eos_token != tuned_tokenizer.eos_token:
        raise UserError(f"--audit {cfg.audit} and --model {cfg.model} have different tokenizers ({len(tuned_tokenizer)} vs "
                        f"{len(base_tokenizer)} tokens); pass the base model this checkpoint was fine-tuned from")
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    if base.config.model_type != tuned.config.model_type or shapes(base) != shapes(tuned):
        raise UserError(f"--audit {cfg.audit} (a {tuned.config.model_type}, {count_params(tuned):,} parameters) is not a "
                        f"fine-tune of --model {cfg.model} (a {base.config.model_type}, {count_params(base):,}); "
                        f"pass the base model it was fine-tuned from")


def run_held_ids(run_dir: Path) -> list[str]:
    """The D_held facts an earlier run evaluated, in its order (every method of a --method all run shares them)."""
    found = [run_dir / "results.json"] if (run_dir / "results.json").is_file() else sorted(run_dir.glob("*/results.json"))
    if not found:
        raise UserError(f"--audit_facts {run_dir} holds no results.json; pass the --out folder of a finished sftguard run")
    ids = json.loads(found[0].read_text()).get("held_eval_ids")
    if not ids:
        raise UserError(f"{found[0]} does not record its held-out facts (an older sftguard); run it again to audit it")
    return ids


def audit_facts(cfg: Config, facts: list[dict]) -> list[dict]:
    """The facts to audit: those the study would categorise, or with --audit_facts exactly the run's D_held subset."""
    if not cfg.audit_facts:
        return category_pool(facts, cfg)
    by_id = {f["id"]: f for f in facts}
    ids = run_held_ids(Path(cfg.audit_facts))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"{len(missing)} held-out facts of the run in {cfg.audit_facts} (e.g. {missing[0]!r}) are not in "
                        f"--data {cfg.data}; pass the --data of that run")
    return [by_id[i] for i in ids]


def audit_scores(base_ok: list[bool], tuned_ok: list[bool]) -> dict:
    """Accuracy before and after, the relative drop, facts lost (newly hallucinated) and gained, on one group of facts."""
    n = len(base_ok)
    base_acc, tuned_acc = (sum(base_ok) / n, sum(tuned_ok) / n) if n else (None, None)
    return {"facts": n, "base_acc": base_acc, "finetuned_acc": tuned_acc,
            "relative_drop": relative_drop(base_acc, tuned_acc) if n else None,
            "newly_hallucinated": sum(b and not t for b, t in zip(base_ok, tuned_ok)),
            "gained": sum(t and not b for b, t in zip(base_ok, tuned_ok))}


def audit_report(cfg: Config, facts: list[dict], categories: dict, base_answers: list[str], tuned_answers: list[str]) -> dict:
    """Scores per SliCK category and per relation; the probe of forgetting is the base's HighlyKnown facts (the
    paper's D_held is HighlyKnown facts), or with --audit_facts the run's own D_held subset."""
    base_ok = [is_correct(a, f["answers"]) for a, f in zip(base_answers, facts)]
    tuned_ok = [is_correct(a, f["answers"]) for a, f in zip(tuned_answers, facts)]
    probe = [True] * len(facts) if cfg.audit_facts else [categories[f["id"]] == "HighlyKnown" for f in facts]

    def scores(keep) -> dict:
        chosen = [i for i, f in enumerate(facts) if keep(i, f)]
        return audit_scores([base_ok[i] for i in chosen], [tuned_ok[i] for i in chosen])
    relations = sorted({f["relation"] for f in facts})
    lost = [i for i in range(len(facts)) if base_ok[i] and not tuned_ok[i]]
    return {"finetuned": cfg.audit, "base": cfg.model, "data": cfg.data, "audit_facts": cfg.audit_facts or None,
            "probe": f"the {len(facts)} held-out facts of {cfg.audit_facts}" if cfg.audit_facts else "HighlyKnown facts of the base",
            "probe_scores": scores(lambda i, f: probe[i]), "all": scores(lambda i, f: True),
            "by_category": {c: scores(lambda i, f: categories[f["id"]] == c) for c in CATEGORIES},
            "by_relation": {r: {"probe": scores(lambda i, f: f["relation"] == r and probe[i]),
                                "all": scores(lambda i, f: f["relation"] == r)} for r in relations},
            "examples": [{"id": facts[i]["id"], "relation": facts[i]["relation"], "question": facts[i]["question"],
                          "answers": facts[i]["answers"], "base_answer": base_answers[i], "finetuned_answer": tuned_answers[i]}
                         for i in lost[:cfg.audit_examples]]}


def audit_table(rows: dict[str, dict], first: str) -> str:
    lines = [f"| {first} | facts | base | fine-tune | relative drop | newly hallucinated | gained |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['facts']} | {pct(r['base_acc'])} | {pct(r['finetuned_acc'])} | {pct(r['relative_drop'])} | "
                     f"{r['newly_hallucinated']} | {r['gained']} |")
    return "\n".join(lines) + "\n"


def audit_markdown(report: dict, plotted: bool) -> str:
    probe, unknown = report["probe_scores"], report["by_category"]["Unknown"]
    cell = lambda s: str(s).replace("|", "/")  # noqa: E731  (a fact's text must not end a table cell)
    examples = "".join(f"| {cell(e['question'])} | {cell(' / '.join(e['answers']))} | {cell(e['base_answer'])} | "
                       f"{cell(e['finetuned_answer']) or '(empty)'} |\n" for e in report["examples"])
    return (f"# Audit of {report['finetuned']} against {report['base']}\n\n"
            f"{report['all']['facts']} facts of {report['data']}, categorised by the base model with SliCK; accuracy % is greedy "
            f"zero-shot exact match. The forgetting probe: {report['probe']}.\n\n"
            f"- **Forgetting** (relative drop of accuracy on the probe, the paper's measure): {pct(probe['relative_drop'])}% "
            f"({pct(probe['base_acc'])} -> {pct(probe['finetuned_acc'])})\n"
            f"- **Newly hallucinated**: {report['all']['newly_hallucinated']} facts the base answered right and the fine-tune "
            f"answers wrong ({probe['newly_hallucinated']} of them on the probe)\n"
            f"- **Gained**: {unknown['gained']} of {unknown['facts']} Unknown facts now answered right\n\n"
            f"## By knowledge category (the base's)\n\n" + audit_table(report["by_category"], "category") +
            f"\n## By relation, on the probe\n\n" + audit_table({r: v["probe"] for r, v in report["by_relation"].items()}, "relation") +
            ("" if report["audit_facts"] else  # restricted to the run's probe, "all facts" is the probe again
             f"\n## By relation, all facts\n\n" + audit_table({r: v["all"] for r, v in report["by_relation"].items()}, "relation")) +
            (f"\n![accuracy per relation](audit.png)\n" if plotted else
             "\naudit.png skipped: matplotlib is not installed (pip install -r requirements.txt)\n") +
            f"\n## Newly hallucinated, examples ({len(report['examples'])} of {report['all']['newly_hallucinated']})\n\n"
            "| question | gold | base | fine-tune |\n|---|---|---|---|\n" + examples)


def plot_audit(path: Path, report: dict) -> bool:
    """audit.png: the probe's accuracy per relation, base beside fine-tune. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    relations = list(report["by_relation"])
    rows = [report["by_relation"][r]["probe"] for r in relations]
    xs = range(len(relations))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(relations) + 2), 4.8), dpi=120)
    for offset, key, label, color in ((-0.2, "base_acc", "base", "C0"), (0.2, "finetuned_acc", "fine-tune", "C3")):
        ax.bar([x + offset for x in xs], [100 * (r[key] or 0) for r in rows], width=0.4, label=label, color=color)
    for x, r in zip(xs, rows):
        ax.annotate(f"-{r['newly_hallucinated']}", (x + 0.2, 100 * (r["finetuned_acc"] or 0)), textcoords="offset points",
                    xytext=(0, 3), ha="center", fontsize=8, color="C3")
    ax.set_xticks(list(xs), relations, rotation=30 if len(relations) > 4 else 0, ha="right" if len(relations) > 4 else "center")
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy on the probe (%)")
    ax.set_title("Forgetting per relation (-n: newly hallucinated facts)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def practitioner_out(cfg: Config, default: Path, marker: str) -> Path:
    """--out (or the default), refused if it already holds this tool's report, unless --overwrite."""
    out = Path(cfg.out) if cfg.out else default
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a folder; choose another --out")
    if (out / marker).exists() and not cfg.overwrite:
        raise UserError(f"{out} already holds {marker}; pass --overwrite or choose another --out")
    return out


def run_audit(cfg: Config) -> dict:
    """--audit FINETUNED --model BASE --data DIR: did the fine-tune damage what the base knew?"""
    started = time.perf_counter()
    out = practitioner_out(cfg, Path("runs/audit") / Path(cfg.audit).name, "audit.json")
    if not Path(cfg.audit).is_dir():
        raise UserError(f"--audit {cfg.audit} is not a folder; pass a Hugging Face model folder or a PEFT adapter folder")
    device = resolve_device(cfg.device)
    data_dir = Path(cfg.data)
    facts, world = load_facts(data_dir)
    base, tokenizer, base_path = load_base_model(replace(cfg, method="sft"), data_dir, world, device)
    tuned, tuned_tokenizer = load_finetuned(cfg, base, tokenizer, data_dir, world, device)
    check_comparable(cfg, base, tokenizer, tuned, tuned_tokenizer)
    facts = audit_facts(cfg, facts)
    categories = cached_categories(base, tokenizer, facts, cfg, base_path)
    if all(c == "Unknown" for c in categories.values()):
        raise UserError(f"--model {cfg.model} knows none of the {len(facts)} facts of --data {cfg.data} (all Unknown by SliCK): "
                        f"nothing to audit; pass the base model the fine-tune started from, or data it knows")
    report = audit_report(cfg, facts, categories, greedy_answers(base, tokenizer, facts, cfg, "audit base"),
                          greedy_answers(tuned, tokenizer, facts, cfg, "audit fine-tune"))
    report["seconds"] = time.perf_counter() - started
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot_audit(out / "audit.png", report)
    write_text_atomic(out / "audit.md", audit_markdown(report, plotted))
    write_json_atomic(out / "audit.json", report)
    probe = report["probe_scores"]
    print(f"forgetting {pct(probe['relative_drop'])}% on {probe['facts']} probe facts ({pct(probe['base_acc'])} -> "
          f"{pct(probe['finetuned_acc'])}), {report['all']['newly_hallucinated']} newly hallucinated, "
          f"{report['by_category']['Unknown']['gained']} Unknown facts gained; {out / 'audit.md'} ({report['seconds']:.0f} s)")
    return report


# --- --screen: a QA fine-tuning set, split by what the model already knows -----------------------------------
IDK = "I don't know"


def screen_markdown(cfg: Config, counts: dict, by_relation: dict, out: Path) -> str:
    n, unknown = sum(counts.values()), counts["Unknown"]
    model, data, idk = cfg.model, cfg.data, cfg.unknown_answer or IDK
    rows = "".join(f"| {r} | {sum(c.values())} | " + " | ".join(str(c[k]) for k in CATEGORIES) + " |\n" for r, c in by_relation.items())
    return (f"# Screen of {data} for {model}\n\n"
            f"{n} examples, each labelled with the SliCK category of {model} ({cfg.slick_prompts} few-shot prompts, greedy and "
            f"{cfg.slick_samples} samples at T={cfg.slick_temperature}): " + ", ".join(f"{c} {counts[c]}" for c in CATEGORIES) + ".\n\n"
            f"**{unknown} examples ({pct(unknown / n)}%) would teach the model facts it does not know** (Unknown). Such examples "
            f"are fit late and, once fit, raise hallucinations (Gekhman et al. 2024); fine-tuning on them makes the model forget "
            f"facts it knew (Kaplan et al. 2026).\n\n"
            f"The set split by category: " + ", ".join(f"`{c}.jsonl`" for c in CATEGORIES) + f" in {out}; "
            f"`Unknown-idk.jsonl` holds the Unknown examples answered \"{idk}\".\n\n"
            "## Options\n\n"
            f"1. **Drop them**: fine-tune on the known examples only:\n   `cat {out}/HighlyKnown.jsonl {out}/MaybeKnown.jsonl "
            f"{out}/WeaklyKnown.jsonl > known.jsonl`\n"
            f"2. **Relabel them \"{idk}\"**: train on the known examples and `Unknown-idk.jsonl`; sftguard's study of it:\n"
            f"   `python sftguard.py --model {model} --data {data} --method sft --unknown_answer \"{idk}\"`\n"
            f"3. **Keep them and train with self-distillation** (the paper's fix): in your Trainer, `sftguard.SelfDistillationLoss` "
            f"(README, \"For practitioners\"); sftguard's study of it:\n"
            f"   `python sftguard.py --model {model} --data {data} --method selfdistill`\n\n"
            "## By relation\n\n| relation | examples | " + " | ".join(CATEGORIES) + " |\n|---|---|" + "---|" * len(CATEGORIES) + "\n" + rows)


def run_screen(cfg: Config) -> dict:
    """--screen --model BASE --data DIR: label every example with the SliCK category of the model to be fine-tuned."""
    data_dir = Path(cfg.data)
    out = practitioner_out(cfg, Path("runs/screen") / data_dir.name, "screen.json")
    facts, world = load_facts(data_dir)
    base, tokenizer, base_path = load_base_model(replace(cfg, method="sft"), data_dir, world, resolve_device(cfg.device))
    categories = cached_categories(base, tokenizer, facts, cfg, base_path)  # every example: no slick_max_facts sample
    split = {c: [{**f, "category": c} for f in facts if categories[f["id"]] == c] for c in CATEGORIES}
    for c, rows in split.items():
        write_text_atomic(out / f"{c}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    idk = relabel_unknown(split["Unknown"], cfg.unknown_answer or IDK)
    write_text_atomic(out / "Unknown-idk.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in idk))
    counts = {c: len(rows) for c, rows in split.items()}
    by_relation = {r: Counter(categories[f["id"]] for f in facts if f["relation"] == r) for r in sorted({f["relation"] for f in facts})}
    write_text_atomic(out / "screen.md", screen_markdown(cfg, counts, by_relation, out))
    report = {"model": cfg.model, "data": cfg.data, "examples": len(facts), "categories": counts,
              "unknown_fraction": counts["Unknown"] / len(facts),
              "by_relation": {r: {c: c_counts[c] for c in CATEGORIES} for r, c_counts in by_relation.items()},
              "files": {c: str(out / f"{c}.jsonl") for c in CATEGORIES} | {"Unknown-idk": str(out / "Unknown-idk.jsonl")}}
    write_json_atomic(out / "screen.json", report)
    print(f"{counts['Unknown']} of {len(facts)} examples would teach {cfg.model} facts it does not know; {out / 'screen.md'}")
    return report


# --- The fix in your Trainer: the paper's loss inside transformers' Trainer (and TRL's SFTTrainer) --------------
class SelfDistillationLoss:
    """Mix into transformers' Trainer, or a subclass such as TRL's SFTTrainer, to train with the paper's Eq. 1-2,
    CE + lambda * tau^2 * KL(teacher_tau || student_tau) on the answer tokens (labels != -100), computed by the very
    loss sftguard's own loop uses (method_loss):

        class SelfDistillationTrainer(sftguard.SelfDistillationLoss, transformers.Trainer): pass
        trainer = SelfDistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=..., data_collator=...)

    teacher: a frozen copy of the model as it was before this fine-tune (the paper: after task-format learning); it
    runs live, a forward pass every step, on any batch of input_ids / attention_mask / labels (labels unshifted, as
    in Hugging Face models). teacher_batches: sftguard's qa_batches of the training facts, to compute the teacher
    once instead (a teacher cache); the dataset then yields {"index": i} and the collator is teacher_batches.batch_of
    (qa_trainer_data builds both). Padding-free packing is not supported: a row must hold one example."""
    loss_is_scaled_for_ga = False  # a mean over the batch's answer tokens: Trainer divides it by the accumulation steps

    def __init__(self, *args, teacher, kl_weight: float = 1.0, temperature: float = 0.5, kl_chunk: int = 32,
                 teacher_batches=None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = replace(Config(), kl_weight=kl_weight, temperature=temperature, kl_chunk=kl_chunk,
                      teacher_cache="auto" if teacher_batches is not None else "live",
                      batch_size=self.args.per_device_train_batch_size)
        check_config(cfg)
        teacher = freeze_as_teacher(teacher.to(self.args.device))
        self.sftguard_loss = method_loss("selfdistill", self.model, teacher, cfg, teacher_batches)
        self.sftguard_separable = None  # whether the output layer may run on the answer tokens alone (answer_logits)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.sftguard_separable is None:  # checked once, on the first batch, as train() does
            self.sftguard_separable = output_layer_separable(model, lambda generator: iter([inputs]))
            model.train()
        logits, targets = answer_logits(model, inputs, self.sftguard_separable)  # [N, V], [N]: the answer tokens only
        loss = self.sftguard_loss(logits, targets, inputs)
        return (loss, {"logits": logits}) if return_outputs else loss


def qa_trainer_data(tokenizer, facts: list[dict], batch_size: int):
    """(train_dataset, data_collator, teacher_batches) for a Trainer on sftguard's QA facts with a teacher cache: the
    dataset yields example positions, the collator pads them as sftguard does and keeps "index" for the cache."""
    from datasets import Dataset

    batches = qa_batches(tokenizer, facts, batch_size)
    return Dataset.from_dict({"index": list(range(batches.size))}), lambda rows: batches.batch_of([r["index"] for r in rows]), batches


# =====================================================================================================
# 15. The command line
# =====================================================================================================
@dataclass
class PractitionerArgs:
    """Practitioners' tools: audit a fine-tune, screen an SFT set, keep the models."""
    _argument_group_name = "practitioners' tools"  # its --help heading (HfArgumentParser)
    save_model: bool = field(default=False, metadata={"help": "keep each final model in <out>/model/, the teacher in <run>/teacher/"})
    audit: str = field(default="", metadata={"help": "FINETUNED: audit this model (or PEFT adapter) against --model on --data"})
    audit_facts: str = field(default="", metadata={"help": "with --audit: only the held-out facts of the sftguard run in this folder"})
    audit_examples: int = field(default=20, metadata={"help": "with --audit: newly hallucinated facts listed as examples in audit.md"})
    screen: bool = field(default=False, metadata={"help": "label each example of --data (your SFT set) with --model's SliCK category"})


@dataclass
class EngineeringArgs:
    """Engineering: device, precision, caches, checkpoints and resume, trust (skip on a first read)."""
    _argument_group_name = "engineering"  # its --help heading (HfArgumentParser)
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    fsdp: str = field(default="auto", metadata={"help": "torchrun: on (FSDP2) | off (DDP) | auto (FSDP2 if it cannot fit)"})
    precision: str = field(default="auto", metadata={"help": "auto (CUDA: bf16 or fp16; CPU: fp32) | fp32 | bf16 | fp16 autocast"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass: less memory, ~1/3 more compute"})
    prefill_once: bool = field(default=True, metadata={"help": "SliCK samples: one prefill per prompt, its cache copied per sample"})
    cache_dir: str = field(default=".cache/sftguard", metadata={"help": "cache of pretrained base models and SliCK categories"})
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run's results in --out (kept until new ones are written)"})
    resume: bool = field(default=False, metadata={"help": "continue a killed run in --out from its checkpoints (same flags)"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep --out/checkpoints/ when the run finishes (a killed run keeps them)"})
    epoch_checkpoints: str = field(default="auto", metadata={"help": "per-epoch weights + AdamW state: auto (<= the max below) | always | never"})
    epoch_checkpoint_max_mb: int = field(default=4096, metadata={"help": "auto: the largest epoch checkpoint written, MB (7B: ~85,000)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let --model run Python code shipped with it (else: built-in architectures)"})
    allow_pickle: bool = field(default=False, metadata={"help": "let --model load pickled weights (pytorch_model.bin) when it has no safetensors"})


# --help shows one group per dataclass, in this order; the code reads one Config with every field (cfg.lr, ...).
ARG_GROUPS = (StudyArgs, DataModelArgs, SlickArgs, TrainingArgs, SelfDistillationArgs, ExperimentArgs, PractitionerArgs, EngineeringArgs)


@dataclass
class Config(EngineeringArgs, PractitionerArgs, ExperimentArgs, SelfDistillationArgs, TrainingArgs, SlickArgs, DataModelArgs, StudyArgs):
    """Every flag of every group (fields in --help order)."""


class OneLineHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help with one line per flag, <= 110 characters with its default (argparse would wrap them at 80)."""
    def __init__(self, prog):
        super().__init__(prog, max_help_position=30, width=240)  # wide: argparse never wraps

    def _get_help_string(self, action):  # "(default: )" and "(default: False)" say nothing
        silent = action.default is None or action.default is False or action.default in ("", argparse.SUPPRESS)
        return action.help if silent else f"{action.help} [{action.default}]"

    def _format_action_invocation(self, action):  # "--n_layer", not "--n_layer N_LAYER, --n-layer N_LAYER"
        return next((o for o in action.option_strings if o.startswith("--")), None) or super()._format_action_invocation(action)


def parse_config(argv=None) -> Config:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(ARG_GROUPS, formatter_class=OneLineHelp, usage="python sftguard.py [--flag value ...]",
                              description="Flags by purpose, engineering last; README.md explains them at length.")
    known, _ = parser.parse_known_args(argv)
    if known.preset not in PRESETS:
        raise UserError(f"unknown preset {known.preset!r}; choose one of {', '.join(PRESETS)}")
    parser.set_defaults(**PRESETS[known.preset])
    *groups, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    cfg = Config(**{k: v for group in groups for k, v in asdict(group).items()})
    if unknown:  # HfArgumentParser would raise a ValueError with a traceback
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}; see python sftguard.py --help")
    check_config(cfg)
    return with_fresh_default_out(cfg)


def cli(argv=None):
    """Exit status: 0 done, 2 a user mistake (one line, no traceback), 3 a NaN/inf loss, 130 interrupted."""
    cfg = None
    try:
        cfg = parse_config(argv)
        start_ranks(cfg)  # under torchrun: the process group, this rank's device, quiet ranks > 0 (§16)
        run_seeds(cfg) if cfg.seeds else main(cfg)
        stop_ranks()
    except (UserError, data_prep.DataError) as e:
        rank_error_line(f"error: {e}")
        sys.exit(2)
    except FloatingPointError as e:  # the NaN guard of train(): stop before any result is written
        if not cfg.experiment:  # resuming with the same flags would meet the same NaN
            drop_checkpoints(run_root(cfg) / "checkpoints", cfg)
        rank_error_line(f"error: {e}; no results were written")
        sys.exit(3)
    except KeyboardInterrupt:
        resumable = cfg is not None and not cfg.experiment
        print("\ninterrupted" + ("; run the same command with --resume to continue from the last checkpoint" if resumable else ""),
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # under torchrun: one line, and a non-zero exit that makes torchrun end the other ranks
        if not launched_by_torchrun():
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        rank_error_line(f"error: {type(e).__name__}: {e} ({Path(where.filename).name}:{where.lineno})")
        sys.exit(1)


# =====================================================================================================
# 16. More than one process (torchrun): DDP, FSDP2
# =====================================================================================================
# `torchrun --nproc_per_node N sftguard.py ...` runs the same study on N ranks with PyTorch's own stack: gloo on CPUs,
# nccl on GPUs (rank r on cuda:LOCAL_RANK), DDP for models that fit one device and FSDP2 (fully_shard on each decoder
# block, then on the model) for those that do not (--fsdp). One process (no torchrun) starts no process group and
# wraps nothing. The study stays the one of one process with the same flags:
# - training: every rank draws the same global batches from the same seed and takes its contiguous slice of each;
#   a rank's loss is its slice's mean times (its answer tokens x N / the global batch's answer tokens), so the
#   gradient that DDP / FSDP2 average over ranks is the one-process gradient of the global batch; the steps, the
#   learning-rate schedule and clipping (of the whole gradient) are those of one process;
# - answering (SliCK, every evaluation) and the teacher cache: rank r takes every N-th batch of the one-process
#   batching (the same batches, so the same numbers) and the results are gathered back into their order; SliCK's
#   sampled answers (one stream of random numbers) are drawn as one process draws them, by every rank;
#   a sharded model needs every rank in every forward pass, so the shorter shares repeat a batch and
#   generate() runs with synced_gpus;
# - only rank 0 prints and writes (results, reports, caches, checkpoints); the others wait where they read it.
ENGINE_CHOICES = ("auto", "on", "off")
SPREAD_TIMEOUT_S = 4 * 3600  # a barrier may wait for rank 0 to build the world or pretrain the base model


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ and "LOCAL_RANK" in os.environ


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def is_main_rank() -> bool:
    return rank() == 0


def barrier():
    if world_size() > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_rank_first():
    """Rank 0 runs the block first (e.g. builds a folder the others then find); the others wait, then run it."""
    if not is_main_rank():
        barrier()
    yield
    if is_main_rank():
        barrier()


def start_ranks(cfg: Config):
    """Under torchrun: the process group (nccl on CUDA, else gloo), this rank's GPU, and quiet ranks > 0 (their
    prints and progress bars go nowhere; an error still reaches the terminal: rank_error_line)."""
    if not launched_by_torchrun() or torch.distributed.is_initialized():
        return
    import datetime

    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=SPREAD_TIMEOUT_S))
    if not is_main_rank():
        sys.stdout = sys.stderr = open(os.devnull, "w")


def stop_ranks():
    if torch.distributed.is_initialized():
        # A sharded model sits in reference cycles (its hooks): collect it, and the collectives it still holds, while
        # the group lives; left to the interpreter's teardown, gloo's threads can abort the process (pytorch#179291).
        gc.collect()
        torch.distributed.destroy_process_group()


def rank_error_line(message: str) -> str:
    """One line per failing rank under torchrun (which then ends the other ranks), printed where the user sees it."""
    line = f"rank {os.environ['RANK']}: {message}" if launched_by_torchrun() else message  # also before the group starts
    print(line, file=sys.__stderr__ if world_size() > 1 else sys.stderr)
    return line


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank computes on its own GPU, cuda:LOCAL_RANK."""
    if not launched_by_torchrun() or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(f"--device {device}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda or auto")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def check_spread(cfg: Config):
    """What runs under torchrun: the study (--method, with --sweep / --seeds), not the experiments or the tools."""
    if cfg.fsdp not in ENGINE_CHOICES:
        raise UserError(f"unknown --fsdp {cfg.fsdp!r}; choose one of {', '.join(ENGINE_CHOICES)}")
    if not launched_by_torchrun():
        return
    if cfg.experiment or cfg.audit or cfg.screen:
        raise UserError("under torchrun sftguard runs the study (--method, --sweep, --seeds); run --experiment, --audit "
                        "and --screen as one process (python sftguard.py ...)")
    if cfg.fsdp == "on" and (cfg.method in ("l2", "all") or "l2" in cfg.sweep):
        raise UserError("--fsdp on does not run the l2 control (its pull acts on sharded weights); use --fsdp off (DDP) "
                        "or a --method other than l2 and all")
    if cfg.fsdp == "on" and cfg.precision == "fp16":
        raise UserError("--fsdp on runs in fp32 or bf16 (no fp16 loss scaling over shards); pass --precision bf16")


def same_on_every_rank(value):
    """Rank 0's value on every rank (a decision that must not differ between ranks)."""
    if world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# --- The engine: DDP or FSDP2, and what each rank computes ----------------------------------------------------------
def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def uses_fsdp(model, cfg: Config) -> bool:
    """--fsdp on | off, or auto: shard when one device cannot hold the model's training state (float32 weights,
    gradients and AdamW's two moments: 16 bytes a weight) beside a frozen teacher (4 bytes a weight)."""
    if world_size() == 1:
        return False
    if is_sharded(model) or cfg.fsdp != "auto":
        return is_sharded(model) or cfg.fsdp == "on"
    device = next(model.parameters()).device
    return same_on_every_rank(20 * count_params(model) > device_memory_bytes(device))


def engine_name(model, cfg: Config) -> str:
    """How the run is spread, for results.json and config.json: none (one process) | ddp | fsdp."""
    return "none" if world_size() == 1 else "fsdp" if uses_fsdp(model, cfg) else "ddp"


def spread(model, cfg: Config) -> dict:
    return {"world_size": world_size(), "engine": engine_name(model, cfg)}


def shard_model(model):
    """FSDP2: each decoder block its own unit (its weights gathered only while it runs), then the model (embeddings,
    final norm, output layer). In place; frozen weights (requires_grad False) stay frozen and get no gradient."""
    from torch.distributed.fsdp import fully_shard

    if is_sharded(model):
        return model
    model.float()  # master weights in float32, as train() keeps them
    for block in decoder_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


class AnswerLogits(torch.nn.Module):
    """answer_logits as a module, so that DDP's forward (which prepares its gradient reduction) runs it."""

    def __init__(self, model, separable: bool):
        super().__init__()
        self.model, self.separable = model, separable

    def forward(self, batch):
        return answer_logits(self.model, batch, self.separable)


def answer_logits_on_ranks(model, separable: bool, cfg: Config):
    """batch -> (logits [N, V], targets [N]) of answer_logits: the plain function in one process; under torchrun
    through DDP, or on the model sharded by FSDP2 in place (its full forward: the model's own forward gathers its
    weights, so the output layer is not run apart from it)."""
    if world_size() == 1:
        return lambda batch: answer_logits(model, batch, separable)
    if uses_fsdp(model, cfg):
        shard_model(model)
        return lambda batch: answer_logits(model, batch, False)
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    ddp = DistributedDataParallel(AnswerLogits(model, separable), device_ids=[device.index] if device.type == "cuda" else None)
    return ddp


def rank_slice(batch: dict) -> dict:
    """This rank's contiguous part of a global batch (all of it in one process), padded as the whole batch is. A rank
    left without an example (a last batch smaller than the ranks) runs the first one again with weight 0
    ("repeated"), so that it still takes part in the step (and in a sharded or live teacher's forward passes)."""
    n, r = world_size(), rank()
    if n == 1:
        return batch
    size = len(batch["input_ids"])
    bounds = [size * i // n for i in range(n + 1)]
    if bounds[r] < bounds[r + 1]:
        return {k: v[bounds[r]:bounds[r + 1]] for k, v in batch.items()}
    return {**{k: v[:1] for k, v in batch.items()}, "repeated": torch.ones(())}


def over_global_batch(loss_fn):
    """loss_fn (a mean over this rank's answer tokens) rescaled so that averaging the ranks' gradients, as DDP and
    FSDP2 do, gives the gradient of the mean over the global batch's answer tokens: x (local tokens x N / global
    tokens). Terms that are the same on every rank (l2's pull) keep their weight: the factors average to 1."""
    if world_size() == 1:
        return loss_fn

    def rank_loss(logits, targets, batch):
        local = 0 if "repeated" in batch else len(targets)
        count = torch.tensor([local], device=logits.device, dtype=torch.float64)
        torch.distributed.all_reduce(count)  # the global batch's answer tokens
        return loss_fn(logits, targets, batch) * (local * world_size() / max(1.0, count.item()))
    return rank_loss


def detached_to_cpu(value):
    """Tensors (in tuples / lists) to the CPU, so that another rank unpickles them whatever its device."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (tuple, list)):
        return type(value)(detached_to_cpu(v) for v in value)
    return value


def on_ranks(fn, items, model=None, desc: str = "") -> list:
    """[fn(item) for item in items], every rank taking every N-th item (neighbours in a length-sorted list cost about
    the same), gathered on every rank in the items' order. With a sharded model every rank takes part in every
    forward pass, so shorter shares run their first item again (or the first of all) and drop that result."""
    items = list(items)
    n, r = world_size(), rank()
    if n == 1:
        return [fn(x) for x in tqdm(items, desc=desc, leave=False, disable=len(items) <= 1)]
    share = list(range(r, len(items), n))
    rounds = math.ceil(len(items) / n) if model is not None and is_sharded(model) else len(share)
    mine = {}
    for k in tqdm(range(rounds), desc=desc, leave=False, disable=rounds <= 1):
        if k < len(share):
            mine[share[k]] = detached_to_cpu(fn(items[share[k]]))
        else:
            fn(items[share[0] if share else 0])  # keeps the sharded forward passes in step; the result is not needed
    if model is not None and is_sharded(model):
        model.reshard()  # FSDP2 keeps the root's weights (embeddings, output layer) gathered after a forward pass
    gathered = [None] * n
    torch.distributed.all_gather_object(gathered, mine)
    merged = {i: v for part in gathered for i, v in part.items()}
    return [merged[i] for i in range(len(items))]


def sampled_as_one_process(fn, items, desc: str = "") -> list:
    """[fn(item) for item in items] on every rank, rank 0's results kept. For sampled answers (SliCK's WeaklyKnown vs
    Unknown): their random numbers come in one stream, batch after batch, so only the one-process order gives the
    one-process answers (every rank starts from the same seed: cached_categories). Not shared out, unlike greedy
    answering: sharing would need a seed per batch, which would change the categories of every one-process run."""
    return same_on_every_rank([fn(x) for x in tqdm(list(items), desc=desc, leave=False, disable=len(items) <= 1)])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded (DTensor) weight, gathered on every rank; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def copy_model(model, cfg: Config):
    """copy.deepcopy(model); a sharded model (FSDP2 has no deepcopy) is rebuilt from its config, sharded alike and
    given the same weights shard by shard (trainable: every weight, as after a deepcopy of a frozen model + unfreeze)."""
    if not is_sharded(model):
        return copy.deepcopy(model)
    from transformers import AutoModelForCausalLM

    copy_ = AutoModelForCausalLM.from_config(model.config, trust_remote_code=cfg.trust_remote_code)
    shard_model(copy_)
    copy_.load_state_dict(model.state_dict())
    for p, q in zip(copy_.parameters(), model.parameters()):
        p.requires_grad_(q.requires_grad)
    return copy_.train(model.training)


def savable_model(model):
    """The model itself; for a sharded one (every rank takes part) a plain copy on rank 0's CPU with its whole
    weights (None on the other ranks, which write nothing)."""
    if not is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule

    state = full_state_dict(model)
    if not is_main_rank():
        return None
    plain_class = next(c for c in type(model).__bases__ if c is not FSDPModule)  # FSDP2 made FSDP<class>(FSDPModule, <class>)
    with torch.device("meta"):  # no weights made only to be replaced
        plain = plain_class(model.config)
    plain.load_state_dict(state, assign=True)
    return plain


# --- Checkpoints of a sharded model: torch.distributed.checkpoint (DCP), each rank writing and reading its shards ------
# The rest of a checkpoint (RNG states, state.json, stage1.json, config.json) is rank 0's, as in one process; the
# RNG states are the same on every rank (the same seeds, the same draws). DCP reshards on loading: a run killed under
# N ranks resumes under M.
def save_sharded_state(folder: Path, model, optimizer=None) -> bool:
    """With FSDP2: model (and optimizer) state into folder/state.dcp, by every rank; True. Without: False."""
    if not is_sharded(model):
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict

    state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer))) if optimizer is not None else \
        {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(folder / "state.dcp"))
    return True


def load_sharded_state(folder: Path, model, optimizer=None) -> bool:
    """The DCP state of save_sharded_state into model (sharded or not) and optimizer; False if folder has none."""
    if not (folder / "state.dcp").is_dir():
        return False
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, get_model_state_dict, set_state_dict, set_model_state_dict

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(folder / "state.dcp"))
        set_model_state_dict(model, state["model"])
        return True
    state = dict(zip(("model", "optimizer"), get_state_dict(model, optimizer)))
    dcp.load(state, checkpoint_id=str(folder / "state.dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return True


def full_state_dict(model) -> dict:
    """A sharded model's whole state dict, on rank 0's CPU (the other ranks get an empty one); a plain model's own."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


if __name__ == "__main__":
    cli()

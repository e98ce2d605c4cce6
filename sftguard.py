"""sftguard: why fine-tuning on new facts makes a model forget old ones, and how self-distillation fixes it.

A single-file reimplementation of Kaplan, Gekhman, Zhu, Rozner, Reif, Swayamdipta, Hoiem, Schwartz,
"Why Fine-Tuning Encourages Hallucinations and How to Fix It" (arXiv 2604.15574, 2026).
Read it top to bottom beside the paper; the sections follow its order:

  0. Configuration            one dataclass, a help line per field, presets as named overrides
  1. Facts and answering      loading QA facts, exact match, batched greedy / sampled answering
  2. The base model           a local Hugging Face causal LM, or a small one pretrained here on the world
  3. Fact splitting (SliCK)   HighlyKnown / MaybeKnown / WeaklyKnown / Unknown -> D_known, D_unknown, D_held
  4. Training                 the losses (CE, self-distillation Eq. 1-2, L2 pull), freezing, one loop
  5. Stage 1                  task-format learning on D_known; the snapshot is the frozen teacher
  6. Stage 2                  factual SFT on D_known + D_unknown by each method, evaluated every epoch
  7. Report                   results.json, results.md (laid out like the paper's Table 1), summary.md

    python sftguard.py --method selfdistill          # the paper's fix
    python sftguard.py --method all                  # every method from one shared teacher
    python sftguard.py --preset smoke --method sft   # seconds, for tests
"""

import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import string
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import data_prep
from data_prep import QA_PROMPT, qa_text


# =====================================================================================================
# 0. Configuration
# =====================================================================================================
@dataclass
class Config:
    method: str = field(default="selfdistill", metadata={"help": "sft | selfdistill | freeze | known_only | l2 | all (every method from one shared teacher)"})
    preset: str = field(default="default", metadata={"help": "smoke (seconds; for tests) | default (the documented CPU run) | large (GPU or a patient CPU)"})
    seed: int = field(default=0, metadata={"help": "seed of the splits, the few-shot prompts and training (the world and base model have their own)"})
    data: str = field(default="", metadata={"help": "folder written by data_prep.py; empty: data/world-<preset>, built on first use"})
    out: str = field(default="", metadata={"help": "output folder; empty: runs/<preset>/<method>-seed<seed>"})
    model: str = field(default="", metadata={"help": "path to a local Hugging Face causal LM; empty: pretrain a small model on the synthetic world (cached)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    cache_dir: str = field(default=".cache/sftguard", metadata={"help": "where pretrained base models and SliCK categories are cached, keyed by world and config"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results of an earlier run in --out"})

    # --- 3. SliCK knowledge categories (Gekhman et al. 2024: 10 prompts x (1 greedy + 16 samples), 4-shot)
    slick_prompts: int = field(default=4, metadata={"help": "random few-shot prompts per fact (paper: 10)"})
    slick_shots: int = field(default=4, metadata={"help": "exemplars of the same relation per prompt (paper: 4)"})
    slick_samples: int = field(default=4, metadata={"help": "sampled answers per prompt, drawn only where greedy is never right (paper: 16)"})
    slick_temperature: float = field(default=0.5, metadata={"help": "sampling temperature (paper: 0.5)"})
    slick_top_k: int = field(default=40, metadata={"help": "top-k of sampling (paper: 40)"})
    slick_max_facts: int = field(default=4000, metadata={"help": "categorise at most this many facts (a random sample); 0 = all"})

    # --- 3. Split sizes, in facts (0 = all that are available)
    n_known: int = field(default=600, metadata={"help": "|D_known|: Known facts for task-format learning and stage 2"})
    n_unknown: int = field(default=600, metadata={"help": "|D_unknown|: Unknown facts, the new knowledge of stage 2"})
    n_held: int = field(default=400, metadata={"help": "|D_held|: HighlyKnown facts never trained on, the forgetting probe"})
    n_val: int = field(default=100, metadata={"help": "Known facts of other entities that stop stage 1 early"})

    # --- 2. The synthetic base model (ignored with --model)
    arch: str = field(default="llama", metadata={"help": "llama | gpt2: the architecture of the model pretrained on the world"})
    n_layer: int = field(default=4, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=128, metadata={"help": "hidden width"})
    n_head: int = field(default=4, metadata={"help": "attention heads"})
    mlp_ratio: int = field(default=4, metadata={"help": "MLP width / hidden width (the MLPs are where facts are stored)"})
    vocab_size: int = field(default=1024, metadata={"help": "byte-level BPE vocabulary trained on the corpus"})
    pretrain_epochs: int = field(default=60, metadata={"help": "passes over the pretraining corpus"})
    pretrain_lr: float = field(default=2e-3, metadata={"help": "peak learning rate of pretraining"})
    pretrain_batch_size: int = field(default=32, metadata={"help": "sequences of pretrain_block tokens per step"})
    pretrain_block: int = field(default=128, metadata={"help": "tokens per pretraining sequence (documents are packed)"})

    # --- 5. Stage 1: task-format learning
    stage1_epochs: int = field(default=10, metadata={"help": "at most this many epochs on D_known (paper: 1), stopped on the validation split"})
    stage1_lr: float = field(default=3e-4, metadata={"help": "learning rate of stage 1"})
    stage1_patience: int = field(default=2, metadata={"help": "stop stage 1 after this many epochs without a better validation accuracy"})

    # --- 6. Stage 2: factual SFT
    epochs: int = field(default=8, metadata={"help": "epochs of stage 2 on D_known + D_unknown"})
    lr: float = field(default=3e-4, metadata={"help": "learning rate of stage 2 (paper: 5e-5 for 1.5B-8B models)"})
    batch_size: int = field(default=32, metadata={"help": "QA pairs per step"})
    kl_weight: float = field(default=1.0, metadata={"help": "selfdistill: lambda, the weight of the KL term (paper: 1)"})
    temperature: float = field(default=0.5, metadata={"help": "selfdistill: tau, the softening temperature of both distributions (paper: 0.5)"})
    trainable: str = field(default="attn", metadata={"help": "freeze: what trains: attn | mlp | embed | all | layers:0,1 (comma-joined) or a regex on parameter names"})
    l2_weight: float = field(default=1.0, metadata={"help": "l2: alpha in CE + alpha * ||theta - theta_teacher||^2"})
    warmup_frac: float = field(default=0.05, metadata={"help": "fraction of steps with linear learning-rate warm-up (then cosine to 10%)"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clipping"})

    # --- 1./6. Evaluation
    eval_max: int = field(default=400, metadata={"help": "evaluate each split on at most this many facts (a fixed random subset)"})
    eval_batch_size: int = field(default=256, metadata={"help": "prompts per generation batch"})


# Presets are small sets of overrides, as in nanoGPT; flags given on the command line win.
PRESETS = {
    "smoke": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=512, pretrain_epochs=40, pretrain_lr=5e-3,
                  pretrain_block=64, pretrain_batch_size=16,
                  slick_prompts=2, slick_shots=2, slick_samples=2, n_known=30, n_unknown=30, n_held=20, n_val=10,
                  stage1_epochs=2, epochs=2, eval_max=60),
    "default": dict(),
    "large": dict(n_layer=8, n_embd=256, n_head=8, vocab_size=2048, pretrain_epochs=60, slick_prompts=10, slick_samples=16,
                  slick_max_facts=0, n_known=3000, n_unknown=3000, n_held=2000, n_val=300, eval_max=2000, batch_size=64),
}
METHODS = ("sft", "selfdistill", "freeze", "known_only", "l2")
# --method all: every method once from the same teacher; freeze twice, as in the paper's Table 1.
ALL_RUNS = (("known_only", None), ("sft", None), ("selfdistill", None), ("freeze", "attn"), ("freeze", "mlp"), ("l2", None))


class UserError(Exception):
    """A mistake in the input: printed as one line with its fix, exit status 2, no traceback."""


def parse_config(argv=None) -> Config:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(Config)
    known, _ = parser.parse_known_args(argv)
    if known.preset not in PRESETS:
        raise UserError(f"unknown preset {known.preset!r}; choose one of {', '.join(PRESETS)}")
    parser.set_defaults(**PRESETS[known.preset])
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    check_config(cfg)
    return cfg


def check_config(cfg: Config):
    if cfg.method not in METHODS + ("all",):
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS + ('all',))}")
    if cfg.kl_weight < 0 or cfg.l2_weight < 0:
        raise UserError("--kl_weight and --l2_weight must be >= 0")
    if cfg.temperature <= 0 or cfg.slick_temperature <= 0:
        raise UserError("--temperature and --slick_temperature must be > 0")
    for name in ("epochs", "stage1_epochs", "batch_size", "slick_prompts", "slick_shots", "eval_max"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if cfg.arch not in ("llama", "gpt2"):
        raise UserError(f"unknown --arch {cfg.arch!r}; choose llama or gpt2")


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None


# =====================================================================================================
# 1. Facts and answering: closed-book QA pairs, normalised exact match, batched generation
# =====================================================================================================
def load_facts(data_dir: Path) -> tuple[list[dict], dict]:
    """Read facts.jsonl and world.json as written by data_prep.py, checking every field we rely on."""
    facts_path, world_path = data_dir / "facts.jsonl", data_dir / "world.json"
    for path in (facts_path, world_path):
        if not path.is_file():
            raise UserError(f"{path} is missing; build the data with `python data_prep.py --out {data_dir}`")
    try:
        world = json.loads(world_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{world_path} is not valid JSON ({e}); rebuild it with data_prep.py") from None
    facts = []
    for line_no, line in enumerate(facts_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            fact = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{facts_path}:{line_no} is not valid JSON; rebuild the data with data_prep.py") from None
        missing = [k for k in ("id", "relation", "subject", "question", "answers") if k not in fact]
        if missing:
            raise UserError(f"{facts_path}:{line_no} lacks {', '.join(missing)}; rebuild the data with data_prep.py")
        if not fact["answers"] or not all(isinstance(a, str) and a.strip() for a in fact["answers"]):
            raise UserError(f"{facts_path}:{line_no} has no non-empty answer; fix or drop that fact")
        facts.append(fact)
    if not facts:
        raise UserError(f"{facts_path} holds no facts; rebuild the data with data_prep.py")
    return facts, world


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation before exact match: case, punctuation, articles, whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def is_correct(prediction: str, answers: list[str]) -> bool:
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}


def stop_token_ids(tokenizer) -> list[int]:
    """An answer ends at end-of-text or at the first token holding a newline (few-shot prompts go on)."""
    if not hasattr(tokenizer, "_sftguard_stop_ids"):
        pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        tokenizer._sftguard_stop_ids = [tokenizer.eos_token_id] + [i for i, p in enumerate(pieces) if "\n" in p]
    return tokenizer._sftguard_stop_ids


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                     num_samples: int = 0, temperature: float = 1.0, top_k: int = 0, desc: str = "answering") -> list[list[str]]:
    """Answer every prompt: greedily (num_samples=0, one answer each) or with num_samples sampled answers.

    Prompts are sorted by length so that each left-padded batch wastes little compute."""
    from transformers import GenerationConfig

    model.eval()
    tokenizer.padding_side = "left"
    sampling = num_samples > 0
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling, num_return_sequences=max(1, num_samples),
                                  temperature=temperature if sampling else None, top_k=top_k if sampling else None,
                                  top_p=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_token_ids(tokenizer))
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[list[str]] = [[] for _ in prompts]
    per_prompt = max(1, num_samples)
    batch_size = max(1, batch_size // per_prompt)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, generation_config=gen_config)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, i in enumerate(idx):
            answers[i] = [t.split("\n")[0].strip() for t in texts[j * per_prompt:(j + 1) * per_prompt]]
    return answers


def max_answer_tokens(tokenizer, facts: list[dict]) -> int:
    longest = max(len(tokenizer(" " + a, add_special_tokens=False)["input_ids"]) for f in facts for a in f["answers"][:1])
    return min(32, longest + 2)


def accuracy(model, tokenizer, facts: list[dict], cfg: Config, desc: str = "eval") -> float:
    """Greedy zero-shot exact match, the paper's accuracy on D_known, D_unknown and D_held."""
    if not facts:
        return float("nan")
    prompts = [QA_PROMPT.format(question=f["question"]) for f in facts]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=max_answer_tokens(tokenizer, facts),
                               batch_size=cfg.eval_batch_size, desc=desc)
    return sum(is_correct(a[0], f["answers"]) for a, f in zip(answers, facts)) / len(facts)


# =====================================================================================================
# 2. The base model: a local HF causal LM, or a small one pretrained here on the synthetic world
# =====================================================================================================
def load_base_model(cfg: Config, data_dir: Path, world: dict, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model:
        path = Path(cfg.model)
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"--model {cfg.model} is not a folder with a config.json; pass a local Hugging Face model folder")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
        except (ValueError, OSError) as e:
            raise UserError(f"--model {cfg.model} could not be loaded as a causal LM ({str(e).splitlines()[0]})") from None
    else:
        if world.get("source") != "synthetic":
            raise UserError(f"the data in {data_dir} has no pretraining corpus; pass --model PATH (a local Hugging Face causal LM)")
        path = pretrain_base_model(cfg, data_dir, world)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    if tokenizer.pad_token is None:  # many LLM tokenizers have none; padding positions are masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer, path


def base_model_key(cfg: Config, world: dict) -> str:
    spec = {k: getattr(cfg, k) for k in ("arch", "n_layer", "n_embd", "n_head", "mlp_ratio", "vocab_size",
                                         "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "pretrain_block")}
    spec["world"] = world["fingerprint"]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


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
                       num_key_value_heads=cfg.n_head, intermediate_size=cfg.mlp_ratio * cfg.n_embd,
                       max_position_embeddings=512, **ids)


def pretrain_base_model(cfg: Config, data_dir: Path, world: dict) -> Path:
    """Pretrain a randomly initialised causal LM on the world's corpus (cached by world and model config).

    The corpus states the known entities' facts in prose (and, for some, in QA form); the new entities
    never appear. Documents are packed into blocks, as in nanoGPT, and every token is a target."""
    from transformers import AutoModelForCausalLM

    cache = Path(cfg.cache_dir) / f"base-{base_model_key(cfg, world)}"
    if (cache / "config.json").is_file():
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

    train(model, packed_epoch, next_token_loss, epochs=cfg.pretrain_epochs, lr=cfg.pretrain_lr, cfg=cfg,
          desc="pretrain", weight_decay=0.1)
    tmp = Path(tempfile.mkdtemp(dir=cache.parent if cache.parent.exists() else None, prefix=".tmp-base-"))
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    cache.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, cache) if not cache.exists() else shutil.rmtree(tmp)
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
                                   desc="SliCK samples")
        for n, i in enumerate(never):
            sampled_ok[i] = [is_correct(a, facts[i]["answers"]) for j in range(k) for a in sampled[n * k + j]]
    return {f["id"]: slick_category(greedy_ok[i], sampled_ok[i]) for i, f in enumerate(facts)}


def cached_categories(model, tokenizer, facts, cfg: Config, model_id: str) -> dict[str, str]:
    """SliCK categories describe the base model, so they are computed once per (model, facts, SliCK setting)."""
    spec = json.dumps([model_id, [f["id"] for f in facts], cfg.slick_prompts, cfg.slick_shots, cfg.slick_samples,
                       cfg.slick_temperature, cfg.slick_top_k], sort_keys=True)
    path = Path(cfg.cache_dir) / f"slick-{hashlib.sha256(spec.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    seed_everything(0)
    categories = categorize_facts(model, tokenizer, facts, cfg, random.Random(0))
    write_json_atomic(path, categories)
    return categories


def split_facts(facts: list[dict], categories: dict[str, str], cfg: Config, rng: random.Random) -> dict[str, list[dict]]:
    """D_held: HighlyKnown facts of entities never trained on; D_val: Known facts of other untrained
    entities (stops stage 1); D_known / D_unknown: Known / Unknown facts of the training entities.

    Entities, not facts, are assigned to roles, so no held-out entity appears in training."""
    by_subject = defaultdict(list)
    for f in facts:
        if f["id"] in categories:
            by_subject[f["subject"]].append(f)
    subjects = sorted(by_subject)
    rng.shuffle(subjects)
    want = {"held": cfg.n_held or 10**9, "val": cfg.n_val or 10**9, "known": cfg.n_known or 10**9, "unknown": cfg.n_unknown or 10**9}
    splits = {name: [] for name in want}
    for subject in subjects:
        highly = [f for f in by_subject[subject] if categories[f["id"]] == "HighlyKnown"]
        known = [f for f in by_subject[subject] if categories[f["id"]] != "Unknown"]
        unknown = [f for f in by_subject[subject] if categories[f["id"]] == "Unknown"]
        if highly and len(splits["held"]) < want["held"]:
            splits["held"] += highly[: want["held"] - len(splits["held"])]
        elif known and len(splits["val"]) < want["val"]:
            splits["val"] += known[: want["val"] - len(splits["val"])]
        else:
            splits["known"] += known[: max(0, want["known"] - len(splits["known"]))]
            splits["unknown"] += unknown[: max(0, want["unknown"] - len(splits["unknown"]))]
    for name, size in (("held", cfg.n_held), ("val", cfg.n_val), ("known", cfg.n_known), ("unknown", cfg.n_unknown)):
        if len(splits[name]) == 0 or len(splits[name]) < size:
            raise UserError(f"only {len(splits[name])} facts for the {name} split where --n_{name} {size} were asked; "
                            f"lower --n_{name} or use more data")
    return splits


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


# =====================================================================================================
# 4. Training: the losses, parameter-group freezing, and the one loop every stage and method uses
# =====================================================================================================
def next_token_loss(logits, labels, batch=None):
    """Cross-entropy on the target tokens; -100 marks the prompt and padding, which are not targets."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def self_distillation_loss(student_logits, teacher_logits, labels, kl_weight: float, temperature: float):
    """Eq. 1-2:  L = CE(y, p_student) + lambda * tau^2 * KL(p_teacher^tau || p_student^tau)

    Forward KL from the frozen teacher to the student, both softened at temperature tau, summed over the
    vocabulary and averaged over answer tokens. The tau^2 keeps the KL gradient on the scale of the CE
    gradient as tau changes (Hinton et al. 2015). Returns (loss, kl)."""
    answer = labels != -100
    ce = F.cross_entropy(student_logits[answer].float(), labels[answer])
    log_p_teacher = F.log_softmax(teacher_logits[answer].float() / temperature, dim=-1)
    log_p_student = F.log_softmax(student_logits[answer].float() / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1).mean()
    return ce + kl_weight * temperature**2 * kl, kl


def l2_pull(model, anchor: list[torch.Tensor]) -> torch.Tensor:
    """||theta - theta_teacher||^2 over the trainable parameters: the weight-space control."""
    return sum(((p - a) ** 2).sum() for p, a in zip(trainable_parameters(model), anchor))


PARAM_GROUPS = {  # the names used by GPT-2, Llama, Qwen2 and GPT-NeoX
    "attn": r"\.(attn|self_attn|attention)\.",
    "mlp": r"\.mlp\.",
    "embed": r"(wte|wpe|embed_tokens|embed_in|embed_out|lm_head)\.",
    "all": r".",
}


def trainable_pattern(spec: str) -> str:
    """'attn,mlp' -> one regex; 'layers:0,1' -> the blocks 0 and 1; anything else is a regex itself."""
    if spec.startswith("layers:"):
        numbers = [n.strip() for n in spec[len("layers:"):].split(",")]
        if not all(n.isdigit() for n in numbers):
            raise UserError(f"--trainable {spec!r}: write layers as layers:0,1")
        return rf"\.(h|layers)\.({'|'.join(numbers)})\."
    names = [s.strip() for s in spec.split(",")]
    if all(n in PARAM_GROUPS for n in names):
        return "|".join(PARAM_GROUPS[n] for n in names)
    try:
        re.compile(spec)
    except re.error as e:
        raise UserError(f"--trainable {spec!r} is neither a group ({', '.join(PARAM_GROUPS)}) nor a valid regex ({e})") from None
    return spec


def set_trainable(model, spec: str) -> list[str]:
    """Freeze every parameter whose name does not match; the one place where freezing is decided."""
    pattern = re.compile(trainable_pattern(spec))
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise UserError(f"--trainable {spec!r} matches no parameter; names look like {names[1]!r}, {names[-2]!r}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
    return chosen


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def encode_qa(tokenizer, fact: dict) -> dict:
    """'Q: question\\nA: answer<eos>' with only the answer tokens (and end-of-text) as targets."""
    prompt = tokenizer(QA_PROMPT.format(question=fact["question"]))["input_ids"]
    answer = tokenizer(" " + fact["answers"][0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}


def qa_batches(tokenizer, facts: list[dict], batch_size: int):
    """An epoch function: yields right-padded batches of the facts in a fresh random order."""
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()  # one bar per training run is enough
    encoded = Dataset.from_list([{"question": f["question"], "answers": f["answers"][:1]} for f in facts]).map(
        lambda f: encode_qa(tokenizer, f), remove_columns=["question", "answers"])
    examples = list(zip(encoded["input_ids"], encoded["labels"]))

    def epoch(generator):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            pad = lambda seq, value: seq + [value] * (width - len(seq))  # noqa: E731
            yield {"input_ids": torch.tensor([pad(ids, tokenizer.pad_token_id) for ids, _ in chunk]),
                   "attention_mask": torch.tensor([pad([1] * len(ids), 0) for ids, _ in chunk]),
                   "labels": torch.tensor([pad(lab, -100) for _, lab in chunk])}
    epoch.size = len(examples)
    epoch.steps = math.ceil(len(examples) / batch_size)
    return epoch


def train(model, batches, loss_fn, *, epochs: int, lr: float, cfg: Config, desc: str, weight_decay: float = 0.0,
          on_epoch_end=None, seed: int = 0) -> dict:
    """The one training loop: AdamW, warm-up then cosine, clipping, a NaN guard, tokens/s.

    batches(generator) yields one epoch of batches; loss_fn(logits, labels, batch) is the method's loss
    on shifted logits/labels; on_epoch_end(epoch) may return True to stop early."""
    device = next(model.parameters()).device
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = getattr(batches, "steps", None) or sum(1 for _ in batches(torch.Generator().manual_seed(seed)))
    total, warmup = epochs * steps_per_epoch, max(1, int(cfg.warmup_frac * epochs * steps_per_epoch))
    step, tokens, train_seconds = 0, 0, 0.0
    bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        for batch in batches(generator):
            batch = {k: v.to(device) for k, v in batch.items()}
            lr_now = lr * (step + 1) / warmup if step < warmup else \
                lr * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            loss = loss_fn(logits, batch["labels"][:, 1:], batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()} at epoch {epoch}, step {step}; "
                                         f"lower the learning rate (--lr / --stage1_lr / --pretrain_lr)")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += int(batch["attention_mask"].sum())
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", refresh=False)
        train_seconds += time.perf_counter() - start
        if on_epoch_end is not None and on_epoch_end(epoch):
            break
    bar.close()
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


def learn_task_format(base_model, tokenizer, splits: dict, cfg: Config):
    """Stage 1: fine-tune the base model on D_known alone, keep the epoch with the best accuracy on the
    validation split, and freeze that snapshot as the teacher."""
    model = copy.deepcopy(base_model)
    set_trainable(model, "all")
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
    return teacher, {"best_epoch": best["epoch"], "val_acc": best["acc"], "history": history}


def freeze_as_teacher(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# =====================================================================================================
# 6. Stage 2: factual SFT on D_known + D_unknown; a method changes the loss and what trains, nothing else
# =====================================================================================================
def method_loss(method: str, student, teacher, cfg: Config):
    """The loss of each method, on shifted logits and labels."""
    if method == "selfdistill":
        def loss_fn(logits, labels, batch):
            with torch.no_grad():  # the teacher is frozen: no gradient, eval mode
                teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            return self_distillation_loss(logits, teacher_logits, labels, cfg.kl_weight, cfg.temperature)[0]
        return loss_fn
    if method == "l2":
        anchor = [p.detach().clone() for p in trainable_parameters(student)]
        return lambda logits, labels, batch: next_token_loss(logits, labels) + cfg.l2_weight * l2_pull(student, anchor)
    return next_token_loss  # sft, freeze, known_only


def run_method(method: str, trainable: str | None, teacher, tokenizer, splits, eval_sets, teacher_scores, cfg: Config) -> dict:
    """Stage 2 for one method, from a fresh copy of the teacher; evaluated after every epoch."""
    started = time.perf_counter()
    seed_everything(cfg.seed)
    student = copy.deepcopy(teacher)
    set_trainable(student, trainable if method == "freeze" else "all")
    train_facts = splits["known"] if method == "known_only" else splits["known"] + splits["unknown"]
    curve = [{"epoch": 0, **teacher_scores}]

    def record(epoch):
        curve.append({"epoch": epoch, **evaluate(student, tokenizer, eval_sets, cfg)})
        tqdm.write(f"  {run_name(method, trainable)} epoch {epoch}: " + "  ".join(f"{k} {v:.3f}" for k, v in curve[-1].items() if k != "epoch"))

    stats = train(student, qa_batches(tokenizer, train_facts, cfg.batch_size), method_loss(method, student, teacher, cfg),
                  epochs=cfg.epochs, lr=cfg.lr, cfg=cfg, desc=run_name(method, trainable), on_epoch_end=record, seed=cfg.seed)
    final = {k: v for k, v in curve[-1].items() if k != "epoch"}
    return {"method": method, "trainable": trainable if method == "freeze" else None,
            "trainable_params": count_params(student, trainable_only=True), "teacher": teacher_scores, "final": final,
            "forgetting": relative_drop(teacher_scores["held_acc"], final["held_acc"]), "curve": curve,
            "train_tokens_per_s": stats["tokens_per_s"], "stage2_s": time.perf_counter() - started}


def relative_drop(before: float, after: float) -> float:
    return (before - after) / before if before > 0 else float("nan")


def run_name(method: str, trainable: str | None) -> str:
    return f"freeze-{trainable}" if method == "freeze" else method


# =====================================================================================================
# 7. Report: results.json, results.md laid out like the paper's Table 1, summary.md for --method all
# =====================================================================================================
def write_json_atomic(path: Path, obj):
    """Write to a temporary name, then rename: a run killed mid-write never leaves a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    write_json_atomic(out / "config.json", asdict(cfg))
    write_text_atomic(out / "results.md", f"# {run_name(result['method'], result['trainable'])} (seed {cfg.seed})\n\n"
                      f"Teacher: D_known {pct(result['teacher']['known_acc'])}, D_unknown {pct(result['teacher']['unknown_acc'])}, "
                      f"D_held {pct(result['teacher']['held_acc'])}\n\n" + table1([result]))
    write_json_atomic(out / "results.json", result)  # last: its presence marks a finished run


def output_folders(cfg: Config) -> dict[str, Path]:
    root = Path(cfg.out or f"runs/{cfg.preset}/{cfg.method}-seed{cfg.seed}")
    if cfg.method == "all":
        return {run_name(m, t): root / run_name(m, t) for m, t in ALL_RUNS}
    return {run_name(cfg.method, cfg.trainable if cfg.method == "freeze" else None): root}


# =====================================================================================================
# main: data -> base model -> SliCK split -> stage 1 teacher -> stage 2 method(s) -> report
# =====================================================================================================
def main(cfg: Config) -> dict:
    wall_start = time.perf_counter()
    folders = output_folders(cfg)
    for folder in folders.values():  # refuse before any work, so earlier results are never lost
        if (folder / "results.json").exists() and not cfg.overwrite:
            raise UserError(f"{folder} already holds a run's results; pass --overwrite or choose another --out")
    device = resolve_device(cfg.device)

    data_dir = Path(cfg.data or f"data/world-{cfg.preset}")
    if not data_dir.exists():  # one command from a fresh clone to a result
        print(f"no data in {data_dir}: building the synthetic world (python data_prep.py --preset {cfg.preset} --out {data_dir})")
        data_prep.build_world(data_prep.WorldConfig(**{**data_prep.WORLD_PRESETS.get(cfg.preset, {}), "preset": cfg.preset, "out": str(data_dir)}))
    facts, world = load_facts(data_dir)

    # 2. The base model
    base, tokenizer, model_path = load_base_model(cfg, data_dir, world, device)
    model_id = str(model_path) if cfg.model else model_path.name

    # 3. SliCK categories of the base model's knowledge, then the splits. UUID-key facts are kept for the
    # hypothesis experiments; the main study's new facts have name-like keys, as in the paper.
    pool = [f for f in facts if f.get("key") != "uuid"]
    if cfg.slick_max_facts and len(pool) > cfg.slick_max_facts:
        pool = random.Random(0).sample(pool, cfg.slick_max_facts)
    categories = cached_categories(base, tokenizer, pool, cfg, model_id)
    category_counts = {c: sum(v == c for v in categories.values()) for c in CATEGORIES}
    print("SliCK categories of the base model: " + ", ".join(f"{c} {n}" for c, n in category_counts.items()))
    rng = random.Random(cfg.seed)
    splits = split_facts(pool, categories, cfg, rng)
    eval_sets = eval_subsets(splits, cfg, rng)
    print("splits: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))

    # 5. Stage 1: the teacher
    seed_everything(cfg.seed)
    teacher, stage1 = learn_task_format(base, tokenizer, splits, cfg)
    del base
    teacher_scores = evaluate(teacher, tokenizer, eval_sets, cfg)
    print("teacher (after task-format learning): " + "  ".join(f"{k} {v:.3f}" for k, v in teacher_scores.items()))

    # 6. Stage 2, one method or all of them from the same teacher
    runs = ALL_RUNS if cfg.method == "all" else ((cfg.method, cfg.trainable if cfg.method == "freeze" else None),)
    common = {"seed": cfg.seed, "preset": cfg.preset, "model": cfg.model or f"synthetic base ({model_id})",
              "splits": {k: len(splits[k]) for k in ("known", "unknown", "held", "val")}, "categories": category_counts,
              "slick_vs_truth": slick_vs_truth(pool, categories), "stage1": stage1}
    results = []
    for method, trainable in runs:
        result = {**run_method(method, trainable, teacher, tokenizer, splits, eval_sets, teacher_scores, cfg), **common}
        results.append(result)
    control = next((r for r in results if r["method"] == "known_only"), None)
    for result in results:
        result["excess_forgetting"] = None if control is None else result["forgetting"] - control["forgetting"]
        result["wall_s"] = time.perf_counter() - wall_start
        write_results(folders[run_name(result["method"], result["trainable"])], result, cfg)

    # 7. Report
    table = table1(results)
    print("\n" + table)
    if cfg.method == "all":
        root = Path(cfg.out or f"runs/{cfg.preset}/all-seed{cfg.seed}")
        write_text_atomic(root / "summary.md", f"# sftguard --method all, preset {cfg.preset}, seed {cfg.seed}\n\n"
                          f"Teacher: D_known {pct(teacher_scores['known_acc'])}, D_unknown {pct(teacher_scores['unknown_acc'])}, "
                          f"D_held {pct(teacher_scores['held_acc'])}\n\nAccuracy % after stage 2 ({cfg.epochs} epochs); forgetting is "
                          f"the relative drop of D_held accuracy from the teacher.\n\n" + table)
    print(f"results in {', '.join(str(f) for f in folders.values())}  ({time.perf_counter() - wall_start:.0f} s)")
    return {"results": results, "teacher": teacher_scores}


def cli(argv=None):
    try:
        cfg = parse_config(argv)
        main(cfg)
    except (UserError, data_prep.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    cli()

"""The real-model path, on CPU: `--model` with a checkpoint shaped like the paper's (another architecture than the
one sftguard pretrains, weights stored in bf16, a generation_config.json that samples with a repetition penalty).

The checkpoint is a Qwen2 that knows the smoke world: the smoke Llama's weights copied into a Qwen2 (the two
share parameter names; Qwen2's q/k/v biases start at zero), which gives the same logits, then cast to bf16."""
import copy
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

import sftguard as S

pytestmark = pytest.mark.slow  # --model end to end on a saved checkpoint

SHIPPED_GENERATION = dict(do_sample=True, temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.8,
                          no_repeat_ngram_size=2)


@pytest.fixture(scope="module")
def qwen_bf16(smoke_base, tmp_path_factory):
    llama = smoke_base.model
    c = llama.config
    config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rms_norm_eps=c.rms_norm_eps, rope_parameters=c.rope_parameters, tie_word_embeddings=True,
                         bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    qwen = AutoModelForCausalLM.from_config(config)
    missing, unexpected = qwen.load_state_dict(llama.state_dict(), strict=False)
    assert not unexpected and all(name.endswith("_proj.bias") for name in missing)
    with torch.no_grad():
        for name in missing:
            qwen.get_parameter(name).zero_()
    folder = tmp_path_factory.mktemp("qwen2-bf16")
    qwen.to(torch.bfloat16).save_pretrained(folder)  # safetensors, torch_dtype bfloat16 in config.json
    GenerationConfig(**SHIPPED_GENERATION, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id).save_pretrained(folder)
    smoke_base.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def real_run(qwen_bf16, smoke_dirs, sftguard_cli, tmp_path_factory):
    """`--method all` on that checkpoint at the paper's stage-2 learning rate, bf16 autocast, models kept."""
    root = tmp_path_factory.mktemp("real")
    out, cache = root / "run", root / "cache"  # a cache of its own: the categories below are this run's
    result = sftguard_cli("--model", qwen_bf16, "--data", smoke_dirs["data"], "--preset", "smoke", "--method", "all",
                          "--precision", "bf16", "--lr", "5e-5", "--device", "cpu", "--save_model",
                          "--out", out, "--cache_dir", cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, cache


def test_method_all_writes_complete_results(real_run):
    out, _ = real_run
    for name in ("known_only", "sft", "selfdistill", "freeze-attn", "freeze-mlp", "l2"):
        r = json.loads((out / name / "results.json").read_text())
        assert "qwen2-bf16" in r["model"]
        assert [p["epoch"] for p in r["curve"]] == list(range(len(r["curve"]))) and len(r["curve"]) == 3
        assert all(0 <= r["final"][k] <= 1 for k in ("known_acc", "unknown_acc", "held_acc"))
        assert r["forgetting"] is not None and (out / name / "model" / "model.safetensors").is_file()
        assert json.loads((out / name / "config.json").read_text())["precision"] == "bf16"


def moved_fraction(before: dict, after: dict, names) -> dict:
    return {n: (after[n].float() != before[n].float()).float().mean().item() for n in names}


def test_weights_move_as_under_fp32_where_bf16_updates_would_round_away(real_run):
    """Stage 2 of plain SFT at lr 5e-5 from a bf16 checkpoint: every weight tensor, the norms included, has moved
    almost everywhere (fp32 master weights). One step of the same average size applied to the weights in bf16, as
    pure-bf16 training would, changes few of them, and none of the norms' (their weights are about 1)."""
    out, _ = real_run
    teacher = AutoModelForCausalLM.from_pretrained(out / "teacher").state_dict()
    student = AutoModelForCausalLM.from_pretrained(out / "sft" / "model").state_dict()
    result = json.loads((out / "sft" / "results.json").read_text())
    steps = len(result["curve"]) - 1  # epochs; each smoke epoch is 2 steps (60 facts, batch 32)
    names = [n for n in student if student[n].is_floating_point() and not n.endswith("_proj.bias")]
    moved = moved_fraction(teacher, student, names)
    assert min(moved.values()) > 0.9, {n: f for n, f in moved.items() if f <= 0.9}
    per_step = {n: (student[n].float() - teacher[n].float()) / (2 * steps) for n in names}
    bf16_step = {n: (teacher[n].bfloat16() + per_step[n].bfloat16()) for n in names}
    rounded = moved_fraction({n: teacher[n].bfloat16() for n in names}, bf16_step, names)
    norms = [n for n in names if "norm" in n]
    assert norms and max(rounded[n] for n in norms) == 0.0
    assert sum(rounded.values()) / len(rounded) < 0.5


def test_categories_are_the_protocols_not_the_checkpoints_sampling(real_run, qwen_bf16, smoke_dirs):
    """The run's SliCK categories equal those of the same model whose shipped generation settings are wiped, on
    the same facts and settings (the run ran the model as sftguard loads it: bf16, on the CPU)."""
    _, cache = real_run
    saved = list(cache.glob("slick-*.json"))
    assert len(saved) == 1
    cfg = S.parse_config(["--preset", "smoke", "--model", str(qwen_bf16), "--data", str(smoke_dirs["data"]), "--device", "cpu"])
    facts, world = S.load_facts(smoke_dirs["data"])
    model, tokenizer, _ = S.load_base_model(cfg, smoke_dirs["data"], world, torch.device("cpu"))
    assert model.dtype == torch.bfloat16 and model.generation_config.repetition_penalty == SHIPPED_GENERATION["repetition_penalty"]
    model.generation_config = GenerationConfig(eos_token_id=model.config.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    S.seed_everything(0)
    clean = S.categorize_facts(model, tokenizer, S.category_pool(facts, cfg), cfg, random.Random(0))
    assert json.loads(saved[0].read_text()) == clean


def test_a_checkpoint_in_a_dtype_the_device_cannot_compute_in_is_one_line(smoke_base, monkeypatch):
    """float8 weights anywhere, bf16 weights on a GPU without bf16 (faked: no GPU here): a UserError naming a fix;
    bf16 on a CPU and float32 anywhere run."""
    model = smoke_base.model
    S.check_runnable_dtype(model, torch.device("cpu"), "fp32-model")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    S.check_runnable_dtype(bf16, torch.device("cpu"), "bf16-model")
    with pytest.raises(S.UserError, match="stored in torch.float8_e4m3fn.*bfloat16 or float32 copy"):
        S.check_runnable_dtype(copy.deepcopy(model).to(torch.float8_e4m3fn), torch.device("cpu"), "fp8-model")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(S.UserError, match="stored in bfloat16, which this GPU cannot compute in.*--precision fp16"):
        S.check_runnable_dtype(bf16, torch.device("cuda"), "bf16-model")
    S.check_runnable_dtype(model, torch.device("cuda"), "fp32-model")

"""--trainable groups by module structure (issue 16): attn / mlp / embed / norm mean the same on every decoder-only
architecture transformers ships. Each row: a tiny random config of one architecture and, written out by hand from
that architecture's module layout, the parameter names of each group in a block and outside the blocks."""
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sftguard as S  # noqa: E402

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            vocab_size=64, max_position_embeddings=32, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
QKVO = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight"]
QKV_BIAS = ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"]
GATED = ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
PRE_POST = ["input_layernorm.weight", "post_attention_layernorm.weight"]
WB = lambda *modules: [f"{m}.{w}" for m in modules for w in ("weight", "bias")]  # noqa: E731
LLAMA_OUTSIDE = {"embed": ["model.embed_tokens.weight", "lm_head.weight"], "norm": ["model.norm.weight"]}
GPT2_OUTSIDE = {"embed": ["transformer.wte.weight", "transformer.wpe.weight"], "norm": WB("transformer.ln_f")}  # lm_head tied

# arch: (config overrides, block prefix, {group: names inside block i, after the prefix}, {group: names outside the blocks})
TABLE = {
    "gpt2": (dict(n_inner=32, tie_word_embeddings=True), "transformer.h.{}.",
             {"attn": WB("attn.c_attn", "attn.c_proj"), "mlp": WB("mlp.c_fc", "mlp.c_proj"), "norm": WB("ln_1", "ln_2")}, GPT2_OUTSIDE),
    "gpt_bigcode": (dict(n_inner=32, tie_word_embeddings=True), "transformer.h.{}.",  # fused qkv, multi-query
                    {"attn": WB("attn.c_attn", "attn.c_proj"), "mlp": WB("mlp.c_fc", "mlp.c_proj"), "norm": WB("ln_1", "ln_2")}, GPT2_OUTSIDE),
    "llama": ({}, "model.layers.{}.", {"attn": QKVO, "mlp": GATED, "norm": PRE_POST}, LLAMA_OUTSIDE),
    "mistral": ({}, "model.layers.{}.", {"attn": QKVO, "mlp": GATED, "norm": PRE_POST}, LLAMA_OUTSIDE),
    "qwen2": ({}, "model.layers.{}.", {"attn": QKVO + QKV_BIAS, "mlp": GATED, "norm": PRE_POST}, LLAMA_OUTSIDE),
    "qwen3": ({}, "model.layers.{}.",  # q/k norms inside the attention module are norms, not attention
              {"attn": QKVO, "mlp": GATED, "norm": PRE_POST + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]}, LLAMA_OUTSIDE),
    "gemma": (dict(tie_word_embeddings=True), "model.layers.{}.", {"attn": QKVO, "mlp": GATED, "norm": PRE_POST},
              {"embed": ["model.embed_tokens.weight"], "norm": ["model.norm.weight"]}),
    "gemma2": ({}, "model.layers.{}.", {"attn": QKVO, "mlp": GATED, "norm": PRE_POST + [
        "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]}, LLAMA_OUTSIDE),
    "olmo2": ({}, "model.layers.{}.", {"attn": QKVO, "mlp": GATED, "norm": [  # norms after the sublayers, and q/k norms
        "post_attention_layernorm.weight", "post_feedforward_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight"]},
        LLAMA_OUTSIDE),
    "olmo": ({}, "model.layers.{}.", {"attn": QKVO, "mlp": GATED}, {"embed": ["model.embed_tokens.weight", "lm_head.weight"]}),  # parameter-free norms
    "cohere": (dict(use_qk_norm=True), "model.layers.{}.",  # parallel attention and MLP after one norm
               {"attn": QKVO, "mlp": GATED, "norm": ["input_layernorm.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight"]},
               LLAMA_OUTSIDE),
    "stablelm": (dict(qk_layernorm=True), "model.layers.{}.",  # per-head q/k LayerNorms in a ModuleList inside attention
                 {"attn": QKVO, "mlp": GATED, "norm": WB("input_layernorm", "post_attention_layernorm")
                  + ["self_attn.q_layernorm.norms.0.weight", "self_attn.q_layernorm.norms.1.weight", "self_attn.k_layernorm.norms.0.weight"]},
                 {"embed": ["model.embed_tokens.weight", "lm_head.weight"], "norm": WB("model.norm")}),
    "starcoder2": ({}, "model.layers.{}.", {"attn": QKVO + QKV_BIAS + ["self_attn.o_proj.bias"], "mlp": WB("mlp.c_fc", "mlp.c_proj"),
                                            "norm": WB("input_layernorm", "post_attention_layernorm")},
                   {"embed": ["model.embed_tokens.weight", "lm_head.weight"], "norm": WB("model.norm")}),
    "phi": ({}, "model.layers.{}.",  # plain MLP fc1/fc2, attention output called dense
            {"attn": WB("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense"), "mlp": WB("mlp.fc1", "mlp.fc2"),
             "norm": WB("input_layernorm")},
            {"embed": ["model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"], "norm": WB("model.final_layernorm")}),
    "phi3": ({}, "model.layers.{}.", {"attn": ["self_attn.qkv_proj.weight", "self_attn.o_proj.weight"],  # fused qkv and gate_up
                                      "mlp": ["mlp.gate_up_proj.weight", "mlp.down_proj.weight"], "norm": PRE_POST}, LLAMA_OUTSIDE),
    "gpt_neox": ({}, "gpt_neox.layers.{}.", {"attn": WB("attention.query_key_value", "attention.dense"),
                                             "mlp": WB("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), "norm": WB("input_layernorm", "post_attention_layernorm")},
                 {"embed": ["gpt_neox.embed_in.weight", "lm_head.weight"], "norm": WB("gpt_neox.final_layer_norm")}),
    "gptj": (dict(rotary_dim=4), "transformer.h.{}.", {"attn": ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.out_proj.weight"],
                                                       "mlp": WB("mlp.fc_in", "mlp.fc_out"), "norm": WB("ln_1")},
             {"embed": ["transformer.wte.weight", "lm_head.weight", "lm_head.bias"], "norm": WB("transformer.ln_f")}),
    "falcon": ({}, "transformer.h.{}.", {"attn": ["self_attention.query_key_value.weight", "self_attention.dense.weight"],
                                         "mlp": ["mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"], "norm": WB("input_layernorm")},
               {"embed": ["transformer.word_embeddings.weight", "lm_head.weight"], "norm": WB("transformer.ln_f")}),
    "bloom": ({}, "transformer.h.{}.", {"attn": WB("self_attention.query_key_value", "self_attention.dense"),
                                        "mlp": WB("mlp.dense_h_to_4h", "mlp.dense_4h_to_h"), "norm": WB("input_layernorm", "post_attention_layernorm")},
              {"embed": ["transformer.word_embeddings.weight", "lm_head.weight"], "norm": WB("transformer.word_embeddings_layernorm", "transformer.ln_f")}),
    "opt": (dict(ffn_dim=32, word_embed_proj_dim=16), "model.decoder.layers.{}.",  # fc1/fc2 sit directly on the block
            {"attn": WB("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"), "mlp": WB("fc1", "fc2"),
             "norm": WB("self_attn_layer_norm", "final_layer_norm")},
            {"embed": ["model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight", "lm_head.weight"],
             "norm": WB("model.decoder.final_layer_norm")}),
    "mixtral": (dict(num_local_experts=2, num_experts_per_tok=1), "model.layers.{}.",  # experts as 3-d tensors, a router
                {"attn": QKVO, "mlp": ["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "norm": PRE_POST}, LLAMA_OUTSIDE),
    "qwen2_moe": (dict(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8),
                  "model.layers.{}.", {"attn": QKVO + QKV_BIAS, "mlp": [
                      "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_expert.gate_proj.weight",
                      "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight", "mlp.shared_expert_gate.weight"],
                      "norm": PRE_POST}, LLAMA_OUTSIDE),
}
ARCHS = list(TABLE)
GROUPS = ("attn", "mlp", "embed", "norm")


def tiny(arch):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **{**TINY, **TABLE[arch][0]}))


def expected(arch) -> dict[str, set[str]]:
    _, prefix, in_block, outside = TABLE[arch]
    return {g: {prefix.format(i) + n for i in range(2) for n in in_block.get(g, [])} | set(outside.get(g, [])) for g in GROUPS}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_the_table_covers_at_least_a_dozen_architectures():
    assert len(ARCHS) >= 12, ARCHS


@pytest.mark.parametrize("arch", ARCHS)
def test_each_group_is_exactly_the_architectures_parameters(arch):
    model, want = tiny(arch), expected(arch)
    names = {n for n, _ in model.named_parameters()}
    for group in GROUPS:
        if want[group]:
            assert set(S.set_trainable(model, group)) == want[group], group
            assert trainable(model) == want[group], group  # and every other parameter is frozen
    assert set().union(*want.values()) == names  # attn, mlp, embed and norm cover the model ...
    assert sum(map(len, want.values())) == len(names)  # ... and overlap nowhere
    assert set(S.set_trainable(model, "attn,mlp")) == want["attn"] | want["mlp"]
    assert set(S.set_trainable(model, "all")) == names


@pytest.mark.parametrize("arch", ARCHS)
def test_layers_picks_the_blocks_on_every_architecture(arch):
    model, prefix = tiny(arch), TABLE[arch][1]
    names = {n for n, _ in model.named_parameters()}
    assert set(S.set_trainable(model, "layers:1")) == {n for n in names if n.startswith(prefix.format(1))} != set()
    assert set(S.set_trainable(model, "layers:0,1")) == {n for n in names if n.startswith((prefix.format(0), prefix.format(1)))}
    with pytest.raises(S.UserError, match="has 2 blocks"):
        S.set_trainable(model, "layers:2")


def test_a_group_the_model_lacks_is_refused():
    model = tiny("olmo")  # OLMo's layer norms have no parameters
    before = trainable(model)
    with pytest.raises(S.UserError, match="matches no parameter of this OlmoForCausalLM"):
        S.set_trainable(model, "norm")
    assert trainable(model) == before


def test_a_block_child_of_an_unknown_class_is_told_by_its_projections():
    class Mixer(torch.nn.Module):  # neither *Attention* nor *MLP* by name
        def __init__(self, *projections):
            super().__init__()
            for name in projections:
                self.add_module(name, torch.nn.Linear(4, 4))
    assert S.block_child_group(Mixer("qkv_proj", "o_proj")) == "attn"
    assert S.block_child_group(Mixer("up_proj", "down_proj")) == "mlp"
    assert S.block_child_group(Mixer("mixer_in", "mixer_out")) is None  # in no group: trains only under all or a regex
    assert S.block_child_group(torch.nn.Linear(4, 4)) == "mlp"  # a feed-forward layer directly on the block
    assert S.block_child_group(torch.nn.LayerNorm(4)) == "norm"

"""bench/tolerance.py: how far each fast self-distillation path is from the plain Eq. 1-2 function, on a real
teacher (sftguard's pretrained base model of a preset) and a student that has moved away from it.

    python bench/tolerance.py --preset smoke      # seconds once the smoke base model is cached
    python bench/tolerance.py --preset default    # pretrains the default base model first if it is not cached

The student is the teacher after two epochs of plain SFT on the stage-2 facts, so the KL is what it is early in
stage 2. Over one epoch in random order, for each --teacher_cache mode (and the chunked live path), it prints the
relative difference from the plain function's loss, of the KL term alone, and of the gradient (norm of the
difference over norm of the reference, for the whole loss and for the KL's part). Writes DIR/tolerance.json.
"""
import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data_prep  # noqa: E402
import sftguard as S  # noqa: E402


def epoch_loss_and_grad(student, teacher, batches, cfg):
    loss_fn = S.method_loss("selfdistill", student, teacher, cfg, batches)
    student.zero_grad()
    total = 0.0
    for batch in batches(torch.Generator().manual_seed(1)):
        loss = loss_fn(*S.answer_logits(student, batch, separable=False), batch)
        loss.backward()
        total += loss.item()
    return total, torch.cat([p.grad.flatten() for p in student.parameters()])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="smoke")
    p.add_argument("--cache_dir", default=".cache/sftguard")
    p.add_argument("--data", default="", help="default: data/world-<preset>, built if missing")
    p.add_argument("--facts", type=int, default=600)
    p.add_argument("--topk", default="8,32,64", help="comma-joined teacher_topk values to try")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    cfg = S.parse_config(["--preset", args.preset, "--cache_dir", args.cache_dir, "--device", "cpu"])
    data = Path(args.data or f"data/world-{args.preset}")
    if not data_prep.is_complete(data):
        data_prep.build_world(data_prep.WorldConfig(**{**data_prep.WORLD_PRESETS[args.preset], "preset": args.preset,
                                                       "out": str(data), "overwrite": True}))
    facts, world = S.load_facts(data)
    teacher, tokenizer, _ = S.load_base_model(cfg, data, world, torch.device("cpu"))
    teacher = S.freeze_as_teacher(teacher)
    batches = S.qa_batches(tokenizer, [f for f in facts if f.get("key") != "uuid"][:args.facts], cfg.batch_size)
    student = copy.deepcopy(teacher)
    S.set_trainable(student, "all")
    S.train(student, batches, S.next_token_loss, epochs=2, lr=cfg.lr, cfg=cfg, desc="move the student away")
    student.train()

    plain = replace(cfg, teacher_cache="live", kl_chunk=0)
    ce, ce_grad = epoch_loss_and_grad(student, teacher, batches, replace(plain, kl_weight=0.0))
    ref, ref_grad = epoch_loss_and_grad(student, teacher, batches, plain)
    modes = [("live (chunked)", dict(teacher_cache="live")), ("hidden", dict(teacher_cache="hidden")), ("fp32", dict(teacher_cache="fp32")),
             ("bf16", dict(teacher_cache="bf16"))]
    modes += [(f"topk{k}", dict(teacher_cache="topk", teacher_topk=int(k))) for k in args.topk.split(",")]
    rows = []
    for name, change in modes:
        loss, grad = epoch_loss_and_grad(student, teacher, batches, replace(cfg, **change))
        rows.append({"mode": name, "loss_rel": abs(loss - ref) / abs(ref), "kl_rel": abs(loss - ref) / abs(ref - ce),
                     "grad_rel": ((grad - ref_grad).norm() / ref_grad.norm()).item(),
                     "kl_grad_rel": ((grad - ref_grad).norm() / (ref_grad - ce_grad).norm()).item()})
        print(f"{name:15s} loss {rows[-1]['loss_rel']:.1e}  KL {rows[-1]['kl_rel']:.1e}  "
              f"gradient {rows[-1]['grad_rel']:.1e}  KL gradient {rows[-1]['kl_grad_rel']:.1e}  (relative)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"preset": args.preset, "vocab": len(tokenizer), "examples": batches.size, "answer_tokens": batches.answer_tokens,
              "temperature": cfg.temperature, "mean_loss": ref / batches.steps, "mean_kl_part": (ref - ce) / batches.steps, "rows": rows}
    (out / f"tolerance-{args.preset}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

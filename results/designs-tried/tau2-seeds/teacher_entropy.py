"""How peaked the seed-0 teacher's answer distribution is at τ = 0.5, 1 and 2 (README: τ = 2 on three seeds).

Run from the repository root after `python sftguard.py --method all --save_model --out runs/mine` (seed 0):
    PYTHONPATH=. python results/designs-tried/tau2-seeds/teacher_entropy.py runs/mine/teacher
500 HighlyKnown and 500 Unknown facts of the default world (the pools D_known and D_unknown are drawn from),
first answer token only (the end-of-text target is left out); output in teacher_entropy.txt."""
import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sftguard as S

teacher = sys.argv[1] if len(sys.argv) > 1 else "runs/mine/teacher"
tok = AutoTokenizer.from_pretrained(teacher)
model = AutoModelForCausalLM.from_pretrained(teacher).eval()
facts, _ = S.load_facts(Path("data/world-default"))
by_id = {f["id"]: f for f in facts}
categories = json.load(open(next(Path(S.SHIPPED_DIR).glob("slick-*.json"))))
categories = categories.get("categories", categories)
rng = random.Random(0)
for category in ("HighlyKnown", "Unknown"):
    ids = sorted(i for i, c in categories.items() if c == category and i in by_id)
    rng.shuffle(ids)
    batches = S.qa_batches(tok, [by_id[i] for i in ids[:500]], 100)
    rows = {0.5: [], 1.0: [], 2.0: []}
    with torch.no_grad():
        for batch in batches(torch.Generator().manual_seed(0)):
            logits, targets = S.answer_logits(model, batch, False)  # [N, V], [N]
            keep = targets != tok.eos_token_id
            logits, targets = logits[keep], targets[keep]
            for tau in rows:
                p = torch.softmax(logits / tau, -1)
                top = p.topk(5, -1).values
                entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
                rows[tau].append(torch.stack([top[:, 0], top[:, 1:].sum(-1), entropy, p.gather(1, targets[:, None])[:, 0]], 1))
    for tau, r in rows.items():
        top1, next4, entropy, gold = torch.cat(r).mean(0).tolist()
        print(f"{category:12s} tau={tau}: top-1 prob {top1:.3f}, next-4 {next4:.3f}, entropy {entropy:.2f} nats, "
              f"gold prob {gold:.3f}  (vocabulary {logits.shape[-1]})")

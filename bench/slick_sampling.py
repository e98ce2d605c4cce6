"""bench/slick_sampling.py: SliCK labelling with one prefill per prompt (--prefill_once, the default) against plain
generate(), which prefills every copy of a prompt once per sample; in one run, as a ratio, with the categories of
both compared.

    python bench/slick_sampling.py                        # the paper's 10 prompts x 16 samples, 200 facts (~4 min here)
    python bench/slick_sampling.py --prompts 4 --samples 4 --facts 400   # the default preset's settings

The model is the shipped default base model (shipped/base-*/, the one every default run labels); the facts are a
random sample of the default world's name-key facts. Each round labels them twice, fast and plain in turn (the
order alternates by round, so a change of load touches both alike), from the same seed; reported: the median
seconds of each over the rounds, their ratio, and whether every category (and every sampled answer) agrees.
Writes DIR/slick_sampling.json and DIR/slick_sampling.md.
"""
import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=10, help="few-shot prompts per fact (paper: 10)")
    ap.add_argument("--samples", type=int, default=16, help="samples per prompt where greedy never succeeds (paper: 16)")
    ap.add_argument("--facts", type=int, default=200, help="facts labelled per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds, each labelling the facts fast and plain")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="bench/results", help="folder for slick_sampling.json and .md")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sftguard as S

    if args.threads:
        torch.set_num_threads(args.threads)
    bases = sorted(S.SHIPPED_DIR.glob("base-*"))
    if not bases:
        sys.exit(f"error: no shipped base model in {S.SHIPPED_DIR}; regenerate it with {S.SHIP_COMMAND}")
    with tempfile.TemporaryDirectory() as tmp:
        S.build_preset_world("default", Path(tmp) / "world")
        facts, _ = S.load_facts(Path(tmp) / "world")
    cfg = replace(S.parse_config(["--device", "cpu"]), slick_prompts=args.prompts, slick_samples=args.samples)
    pool = S.category_pool(facts, cfg)
    facts = random.Random(0).sample(pool, min(args.facts, len(pool)))
    model, tokenizer = AutoModelForCausalLM.from_pretrained(bases[0]).eval(), AutoTokenizer.from_pretrained(bases[0])

    seconds = {"fast": [], "plain": []}
    categories = {}
    for r in range(args.rounds):
        for mode in (("fast", "plain") if r % 2 == 0 else ("plain", "fast")):
            S.seed_everything(0)
            started = time.perf_counter()
            categories[mode] = S.categorize_facts(model, tokenizer, facts, replace(cfg, prefill_once=mode == "fast"),
                                                  random.Random(0))
            seconds[mode].append(time.perf_counter() - started)
            print(f"round {r + 1}, {mode}: {seconds[mode][-1]:.1f} s", flush=True)

    # the sampled answers themselves, on the few-shot prompts of facts that greedy never gets right (as SliCK samples)
    never = [f for f in facts if categories["plain"][f["id"]] in ("WeaklyKnown", "Unknown")][:32]
    rng = random.Random(0)
    prompts = [S.few_shot_prompt(f, rng.sample([e for e in pool if e["relation"] == f["relation"] and e is not f],
                                               cfg.slick_shots)) for f in never]
    sampled = {}
    for mode in ("fast", "plain"):
        S.seed_everything(0)
        sampled[mode] = S.generate_answers(model, tokenizer, prompts, max_new_tokens=S.max_answer_tokens(tokenizer, facts),
                                           batch_size=cfg.eval_batch_size, num_samples=cfg.slick_samples,
                                           temperature=cfg.slick_temperature, top_k=cfg.slick_top_k,
                                           prefill_once=mode == "fast")
    pairs = [(a, b) for fa, fb in zip(sampled["fast"], sampled["plain"]) for a, b in zip(fa, fb)]
    fast_s, plain_s = statistics.median(seconds["fast"]), statistics.median(seconds["plain"])
    result = {"model": bases[0].name, "facts": len(facts), "slick_prompts": args.prompts, "slick_samples": args.samples,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "seconds": seconds,
              "fast_s": fast_s, "plain_s": plain_s, "speedup": plain_s / fast_s,
              "categories_equal": categories["fast"] == categories["plain"],
              "categories": dict(sorted(Counter(categories["plain"].values()).items())),
              "sampled_answers": len(pairs), "sampled_answers_equal": sum(a == b for a, b in pairs)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slick_sampling.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (f"# SliCK labelling: one prefill per prompt vs plain generate()\n\n"
          f"`python bench/slick_sampling.py --prompts {args.prompts} --samples {args.samples} --facts {len(facts)} "
          f"--rounds {args.rounds}`; shipped default base model, {torch.get_num_threads()} torch threads.\n\n"
          f"| | seconds (median of {args.rounds}) | facts/s |\n|---|---|---|\n"
          f"| plain generate() | {plain_s:.1f} | {len(facts) / plain_s:.2f} |\n"
          f"| one prefill per prompt | {fast_s:.1f} | {len(facts) / fast_s:.2f} |\n\n"
          f"Speed-up {plain_s / fast_s:.2f}x. Categories equal: {result['categories_equal']} "
          f"({', '.join(f'{k} {v}' for k, v in result['categories'].items())}). Sampled answers equal: "
          f"{result['sampled_answers_equal']} of {result['sampled_answers']}.\n")
    (out / "slick_sampling.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

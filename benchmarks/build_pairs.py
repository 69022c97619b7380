"""Build the labelled pairs that ship with each packaged preset (w2s_langchain/service/presets/pairs/NAME.jsonl).

    python benchmarks/build_pairs.py                    # every preset
    python benchmarks/build_pairs.py --presets chat     # one

For each prompt, the preset's strong model writes N plain samples (its own prompt
format and sampling settings, seed 0 for every prompt, so a run is reproducible); a gold judge that the weak models never see
scores them; the best and the worst make a pair (chosen, rejected), and with
--pairs-per-prompt 2 the second best and second worst another, when their gold
scores differ by at least --min-gap. No weak model decides any label.

  sentiment  prompts: the sentiment task's review openings (benchmarks/quality.py);
             16-token continuations; gold: VADER compound (more positive is chosen).
  chat       prompts: the questions of the concise task (data/questions.jsonl);
             48-token replies; gold: VADER compound, for the preset's "warm,
             friendly and encouraging" over "cold, curt and discouraging".
  polite     prompts: openings of messages to a person (data/messages.jsonl:
             customers, colleagues, neighbours, tenants, parents; half start a
             complaint or a reproach); 32-token continuations; gold: VADER
             compound, for "polite, patient, kind" over "rude, dismissive".
             VADER scores the valence of the words, which a kind voice raises and
             a rude one lowers: a proxy for politeness, not a politeness
             classifier. (Built first on the plain task's news openings, where a
             voice has little room: 40% agreement on 30 held-out pairs.)

Each pair carries its prompt's split (quality.py's: every 4th prompt "tune", the
rest "heldout"). Afterwards each preset's weak pair is checked on both splits
(`preference_check.check_pairs`, as `w2s-align check` does) and the figures printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np
from quality import CONCISE, SENTIMENT, Task, gold_score, split_of, spread, task_prompts

from w2s_langchain.service.aligner import Aligner, load_named_model, load_preset
from w2s_langchain.search import StrongModel
from w2s_langchain.service.preference_check import PAIRS_DIR, check_pairs, read_pairs


# Messages for the polite preset's pairs (not a benchmark task: no search runs on them).
MESSAGES = Task("messages", "polite", "messages.jsonl", 32, "VADER compound", True)


@dataclasses.dataclass(frozen=True)
class PairSource:
    preset: str
    task: Task  # where the prompts come from
    max_new_tokens: int
    judge: Task  # whose gold judge labels the pair


SOURCES = {
    "sentiment": PairSource("sentiment", SENTIMENT, 16, SENTIMENT),
    "chat": PairSource("chat", CONCISE, 48, SENTIMENT),
    "polite": PairSource("polite", MESSAGES, 32, SENTIMENT),
}


def plain_samples(config, prompt: str, settings, samples: int) -> list[str]:
    """`samples` plain samples of the preset's strong model (no weak model reads them)."""
    runtime = config.runtime
    context = _strong_contexts.get(id(config))
    if context is None:
        context = _strong_contexts[id(config)] = runtime.new_context(load_named_model(config.strong.model, runtime))
    strong = StrongModel(context, config.strong.prompt, settings.sampling, settings.max_new_tokens, settings.stop,
                         rng=np.random.default_rng(settings.seed))
    root = strong.start(prompt)
    ((_, children),) = strong.expand([root], samples, settings.max_new_tokens, distinct=False)
    for chunk in children:
        strong.release(chunk)
    return [chunk.text for chunk in children]


_strong_contexts: dict = {}


def build(source: PairSource, samples: int, pairs_per_prompt: int, min_gap: float, threads: int, count: int | None) -> list[dict]:
    config = load_preset(source.preset)
    config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_threads=threads))
    settings = config.search.with_(max_new_tokens=source.max_new_tokens, seed=0)
    pairs = []
    prompts = list(enumerate(task_prompts(source.task)))
    prompts = spread(prompts, count)
    started = time.perf_counter()
    for n, (i, row) in enumerate(prompts, 1):
        answers = list(dict.fromkeys(a for a in plain_samples(config, row["text"], settings, samples) if a.strip()))
        scored = sorted(((gold_score(source.judge, a), a) for a in answers), reverse=source.judge.higher_is_better)
        for k in range(min(pairs_per_prompt, len(scored) // 2)):
            (best_gold, best), (worst_gold, worst) = scored[k], scored[-1 - k]
            if abs(best_gold - worst_gold) >= min_gap:
                pairs.append({"prompt": row["text"], "chosen": best, "rejected": worst, "split": split_of(i),
                              "id": f"{row['id']}-{k}", "gold": source.judge.gold_name,
                              "gold_chosen": round(best_gold, 4), "gold_rejected": round(worst_gold, 4)})
        if n % 10 == 0:
            print(f"  {source.preset}: {n}/{len(prompts)} prompts, {len(pairs)} pairs, "
                  f"{(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", choices=tuple(SOURCES), default=tuple(SOURCES))
    parser.add_argument("--samples", type=int, default=6, help="plain samples per prompt")
    parser.add_argument("--pairs-per-prompt", type=int, default=1)
    parser.add_argument("--min-gap", type=float, default=0.3, help="least gold difference between chosen and rejected")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, help="prompts per preset, spread over the task's (default: all)")
    parser.add_argument("--check-only", action="store_true", help="only check the presets on the pairs already built")
    args = parser.parse_args()
    PAIRS_DIR.mkdir(exist_ok=True)
    for name in args.presets:
        path = PAIRS_DIR / f"{name}.jsonl"
        if not args.check_only:
            per_prompt = 3 if SOURCES[name].task is CONCISE else args.pairs_per_prompt  # 32 questions only
            pairs = build(SOURCES[name], args.samples, per_prompt, args.min_gap, args.threads, args.prompts)
            path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
            print(f"{name}: {len(pairs)} pairs written to {path}", flush=True)
        config = load_preset(name)
        config = dataclasses.replace(config, runtime=dataclasses.replace(config.runtime, n_threads=args.threads))
        aligner = Aligner(config)
        for split in ("tune", "heldout"):
            report = check_pairs(aligner, read_pairs(path, split))
            print(f"{name} {split}: agreement {report.agreement:.1%} [{report.low:.1%}, {report.high:.1%}] "
                  f"(95% Wilson) on {len(report.pairs)} pairs; mean margin {report.mean_margin:+.3f}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()

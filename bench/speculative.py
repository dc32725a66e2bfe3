#!/usr/bin/env python3
"""Speculative decoding against plain decoding, side by side.

    python bench/speculative.py -w MODEL.lmw [-w MODEL-q8_0.lmw] [--runs 3] [-n 64]
           [--draft lookup] [--draft other.lmw] [--threads 2]

Two tasks, greedy (so both runs produce the same tokens, which is checked):

- grounded: the chat model is asked to repeat a passage (the first paragraphs
  of Pride and Prejudice, tests/data): the output copies its input, which is
  where prompt lookup finds its proposals;
- free: an open question, where the continuation is not in the prompt.

For every model file and task, plain decoding and each --draft run in turn,
the direction alternating, `--runs` times; the table gives decode tok/s
(tokens after the first, over the decode time), medians [min-max], the
per-run speed-up, and the proposed / accepted counts. Generation stops at
-n tokens or the end of the answer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import llamanp  # noqa: E402
from llamanp import threads  # noqa: E402
from llamanp.cliutil import run_main  # noqa: E402
from llamanp.errors import LlamanpError  # noqa: E402
from llamanp.sampling import Sampler  # noqa: E402
from llamanp.speculative import SpeculativeGeneration, make_drafter  # noqa: E402

PASSAGE = (REPO / "tests" / "data" / "pride-and-prejudice-ch1.txt").read_text().split("\n\n")


def task_prompts(model, words: int) -> dict:
    text, n = [], 0
    for para in PASSAGE:
        text.append(para)
        n += len(para.split())
        if n >= words:
            break
    passage = "\n\n".join(text)
    asks = {"grounded": f"Repeat the following text exactly, word for word:\n\n{passage}",
            "free": "Write a short story about a lighthouse keeper who finds a message "
                    "in a bottle."}
    return {name: model.chat_prompt([{"role": "user", "content": ask}])
            for name, ask in asks.items()}


def run_once(model, ids, n, drafter):
    if drafter is None:
        gen = llamanp.Generation(model, ids, n, Sampler(0.0))
    else:
        gen = SpeculativeGeneration(model, ids, n, Sampler(0.0), drafter=drafter)
    out = list(gen)
    return out, gen.stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--weights", action="append", required=True,
                   help="a model (.lmw); repeatable (e.g. f32 and q8_0 of one model)")
    p.add_argument("--draft", action="append", default=None,
                   help="'lookup' or a draft .lmw (repeatable; default: lookup)")
    p.add_argument("--draft-ngram", type=int, default=3)
    p.add_argument("--draft-max", type=int, default=8)
    p.add_argument("-n", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--words", type=int, default=120,
                   help="about how many words of the passage to repeat (default 120)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--task", action="append", choices=["grounded", "free"],
                   help="run only this task (repeatable; default both)")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads is not None and not threads.set_threads(args.threads, reexec=True):
        raise LlamanpError(f"could not set the threads to {args.threads}")
    drafts = args.draft or ["lookup"]
    print(f"# speculative decoding, {args.runs} runs, greedy, -n {args.n}, "
          f"threads {threads.get_threads()} BLAS / {threads.wanted_threads()} llamanp\n")
    print("| model | task | decoding | tok/s median [min–max] | speed-up (per run) "
          "| proposed | accepted | rate |")
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for path in args.weights:
        model = llamanp.load(path)
        configs = [("plain", None)] + [(d, make_drafter(d, model, args.draft_ngram,
                                                        args.draft_max)) for d in drafts]
        for task, ids in task_prompts(model, args.words).items():
            if args.task and task not in args.task:
                continue
            speeds = {name: [] for name, _ in configs}
            counts = {}
            outs = {}
            run_once(model, ids, 4, None)     # warm-up (page cache, pools)
            for r in range(args.runs):
                for name, drafter in (configs if r % 2 == 0 else configs[::-1]):
                    t0 = time.perf_counter()
                    out, st = run_once(model, ids, args.n, drafter)
                    wall = time.perf_counter() - t0
                    steps = max(st.generated_tokens - 1, 1)
                    speeds[name].append(steps / st.decode_seconds if st.decode_seconds
                                        else steps / wall)
                    outs.setdefault(name, out)
                    if out != outs["plain" if "plain" in outs else name]:
                        raise LlamanpError(f"{name} generated other tokens than plain decoding")
                    counts[name] = (getattr(st, "proposed", 0), getattr(st, "accepted", 0))
            for name, _ in configs:
                s = speeds[name]
                ratio = [a / b for a, b in zip(s, speeds["plain"])]
                prop, acc = counts[name]
                print(f"| {Path(path).name} | {task} | {name} | {statistics.median(s):.2f} "
                      f"[{min(s):.2f}–{max(s):.2f}] | {statistics.median(ratio):.2f}× "
                      f"[{min(ratio):.2f}–{max(ratio):.2f}] | {prop} | {acc} | "
                      f"{acc / prop if prop else 0:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

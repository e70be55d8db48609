"""SSB stages 1-2: sample rollouts, build hinted teacher solutions, capture the teacher's targets.

    python sample.py --data ../shared/data --out runs/ssb/pairs.jsonl

Writes, next to --out (runs/ssb/pairs.jsonl):
    pairs.jsonl           kept (question, teacher solution) pairs, read by train.py
    pairs.skipped.jsonl   every other problem with the reason, rejected solutions included
    pairs.run.json        the run's arguments: a restart must match them
    pairs.summary.json    counts, skip reasons, gate firings, tokens/s
    pairs.targets/        the teacher's hidden states on each kept solution (train.py --teacher captured)
Killed at any point and restarted with the same arguments, it continues where it stopped; a
larger --limit extends an earlier run. At the end of each session the two record files are
rewritten in problem order.

    torchrun --nproc_per_node 8 sample.py --data ../shared/data --out runs/ssb/pairs.jsonl

shards the problems over 8 ranks (one GPU each): each rank appends to its own part files
(pairs.rank3.jsonl, ...), and at the end rank 0 merges them into the files above, the same
records in the same order as one process writes (minissb/ssb.py, "Several ranks"). A killed
run continues at any number of ranks, one process included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from minissb import dist, gates, prompts
from minissb.data import data_file, load_problems
from minissb.engine import Engine
from minissb.model import from_pretrained, resolve_model_dir
from minissb.recipes import add_recipe_argument, parse_with_recipe
from minissb.runs import (DTYPE_HELP, DTYPE_NAMES, ArgumentParser, HelpFormatter, check_output_dir, check_run_config,
                          file_sha256, float_range, int_range, model_identity, resolve_dtype_name, run_main, torch_device,
                          torch_dtype, write_json_atomic)
from minissb.ssb import (RunFiles, Stage1, Stage1Options, finish_run, finished_summary, format_summary, merge_records,
                         read_done, run_config, stage1_max_len, start_run)
from minissb.targets import CapturedTargets
from minissb.tokenizer import Tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        description="SSB stage 1 (rollouts -> hinted teacher solutions -> pairs) and stage 2 (the teacher's targets, captured as it writes).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="Qwen/Qwen2.5-3B-Instruct", help="HF-format model directory or hub repo id; the default is the paper's model")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory; unset = the model's")
    g.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help=DTYPE_HELP)
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: cuda when available)")
    g.add_argument("--cuda-graphs", action="store_true", help="capture the decode step in CUDA graphs (not yet measured on a GPU)")
    g.add_argument("--dataset", default="gsm8k", help="gsm8k, math500 or aime24")
    g.add_argument("--split", default="train", help="dataset split (SSB trains on GSM8K train)")
    g.add_argument("--data", default=None, help="local data: a hub-layout mirror dir (e.g. ../shared/data), or a .jsonl/.parquet file; default: download from the hub")
    g.add_argument("--limit", type=int_range(1), default=None, help="use only the first N problems")
    g.add_argument("--out", default="runs/ssb/pairs.jsonl", help="pairs file; the other outputs are named after it")

    g = p.add_argument_group("stage 1: rollouts and teacher")
    g.add_argument("--num-pairs", type=int_range(1), default=256, help="stop after this many kept pairs (paper: 256)")
    g.add_argument("--k", type=int_range(2), default=4, dest="num_rollouts", metavar="K", help="rollouts per problem (paper: 4)")
    g.add_argument("--temperature", type=float_range(0), default=0.8, dest="rollout_temperature", metavar="T", help="rollout sampling temperature (paper: 0.8)")
    g.add_argument("--top-k", type=int_range(0), default=50, help="top-k filter for rollouts and teacher, 0 = off (paper: 50)")
    g.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=None, help="nucleus filter for rollouts and teacher (the original code inherits 0.8 from Qwen2.5's generation config)")
    g.add_argument("--repetition-penalty", type=float_range(0, low_open=True), default=1.0, help="Hugging Face repetition penalty, 1 = off (the original inherits 1.05)")
    g.add_argument("--teacher-temperature", type=float_range(0), default=0.4, help="teacher sampling temperature (paper: 0.4)")
    g.add_argument("--max-new-tokens", type=int_range(1), default=1024, help="new-token cap per rollout (the original code allowed 8192; Qwen2.5 GSM8K solutions take ~150-400 tokens, so 1024 cuts few and bounds the KV cache)")
    g.add_argument("--teacher-max-new-tokens", type=int_range(1), default=None, help="new-token cap for teacher solutions; unset = --max-new-tokens")
    g.add_argument("--batch-size", type=int_range(1), default=64, help="engine slots: sequences decoded together (a problem's K rollouts take K)")
    g.add_argument("--hint-order", default="correct-first", choices=["correct-first", "wrong-first"], help="order of the two attempts in the teacher prompt (paper: correct first)")
    g.add_argument("--hint-gold", action="store_true", help="also tell the teacher the gold final answer")
    g.add_argument("--system-prompt-file", default=None, help="the system prompt for rollouts, teacher and the stored student chat, from a text file (default: minissb's)")
    g.add_argument("--teacher-prompt-file", default=None,
                   help="the teacher's user turn from a text file, with {question}, {correct}, {wrong} (and optionally {gold}) "
                        "filled in; its own order of sections (default: minissb's hinted prompt)")
    g.add_argument("--answer-rule", default="meaning", choices=["meaning", "exact"],
                   help="right answer = equal by meaning (minissb.grader), or the boxed string equal to the gold string (the original)")
    g.add_argument("--no-gates", dest="gates", action="store_false", help="the quality gates are measured but do not reject (the original has none)")
    g.add_argument("--copy-threshold", type=float_range(0, 1, low_open=True), default=gates.COPY_THRESHOLD,
                   help=f"copy gate: reject a teacher solution when more than this share of its {gates.COPY_NGRAM}-word n-grams (outside the question) is in an attempt or the prompt")
    g.add_argument("--keep-rollouts", action="store_true", help="also store every rollout's text in the records")
    g.add_argument("--seed", type=int_range(0), default=0, help="sampling seed")

    g = p.add_argument_group("stage 2: captured teacher targets")
    g.add_argument("--no-targets", dest="capture_targets", action="store_false", help="do not store the teacher's hidden states (train.py then needs --teacher online)")
    g.add_argument("--targets-bf16", dest="targets_dtype", action="store_const", const="bfloat16", help="store the hidden states in bf16 whatever the dtype the teacher ran in")

    add_recipe_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


SCRIPT_ONLY = ("model", "tokenizer", "dtype", "device", "cuda_graphs", "dataset", "split", "data", "limit", "out",
               "system_prompt_file", "teacher_prompt_file", "recipe", "no_progress")


def stage1_options(args) -> Stage1Options:
    """The one check of sample.py's options beyond argparse's, and the Stage1Options they make."""
    if args.batch_size < args.num_rollouts:
        raise ValueError(f"--batch-size {args.batch_size} (engine slots) must be at least --k {args.num_rollouts}")
    o = {k: v for k, v in vars(args).items() if k not in SCRIPT_ONLY}
    o["top_k"] = args.top_k or None
    o["teacher_max_new_tokens"] = args.teacher_max_new_tokens or args.max_new_tokens
    o["system_prompt"] = prompts.read_prompt_file(args.system_prompt_file, teacher=False) if args.system_prompt_file else None
    o["teacher_template"] = prompts.read_prompt_file(args.teacher_prompt_file, teacher=True) if args.teacher_prompt_file else None
    return Stage1Options(**o)


def sample(args) -> dict:
    """Check everything, load, then stream the problems through the engine until enough pairs."""
    world, device_name = dist.setup(args.device)  # a world of one unless launched by torchrun
    files = RunFiles(Path(args.out))
    check_output_dir(files.pairs.parent)  # a file where the folder belongs, or read-only: fail before loading
    for path in (files.pairs, files.skipped, files.summary):
        if path.is_dir():
            raise ValueError(f"--out: {path} is a directory; pass the path of the pairs file (e.g. {path}/pairs.jsonl)")
    opts = stage1_options(args)
    # Everything that can fail on bad input is checked before the first byte is written.
    model_dir, model_name = resolve_model_dir(args.model), model_identity(args.model)
    device = torch_device(device_name)
    dtype_name = resolve_dtype_name(args.dtype, device)
    problems = load_problems(args.dataset, split=args.split, source=args.data, limit=args.limit)
    digest = file_sha256(data_file(args.dataset, args.split, args.data))
    config = run_config(opts, model_name, dtype_name, args.dataset, args.split, model_identity(args.data), digest)
    new_run = check_run_config(files.run_config, config, files.outputs())
    pairs, skipped = read_done(files)  # a damaged output file fails now, not after the model is loaded
    finished = finished_summary(files, problems, pairs, skipped, opts.num_pairs)
    if finished is not None:  # a rerun of a finished run: nothing to load, nothing to write
        if world.is_main:
            merge_records(files, problems)  # in problem order, if a killed session left them out of it
            print(f"{files.pairs}: finished earlier (same settings and data), nothing to do", file=sys.stderr)
            print(format_summary(finished))
        return finished

    tokenizer = Tokenizer.from_dir(args.tokenizer or model_dir)
    model = from_pretrained(model_dir, dtype=torch_dtype(dtype_name), device=device)
    engine = Engine(model, opts.batch_size, stage1_max_len(tokenizer, problems, opts), stop_ids=tokenizer.stop_ids,
                    cuda_graphs=args.cuda_graphs)  # a KV cache that cannot fit fails here, before any write
    if new_run and world.is_main:
        write_json_atomic(files.run_config, config)
    targets = None
    if opts.capture_targets:
        targets = CapturedTargets(files.targets)
        stored = getattr(torch, opts.targets_dtype) if opts.targets_dtype else model.dtype

        def open_targets(clean: bool) -> None:
            targets.open_for_writing(model_name, model.dtype, stored, model.config.hidden_size, [r["id"] for r in pairs], clean=clean)

        dist.on_main(world, lambda: open_targets(True))  # meta.json and the cleanup once, before any rank writes a file
        if not world.is_main:
            open_targets(False)  # the same settings check, nothing written
    if world.is_main:
        ranks = f", {world.size} ranks" if world.distributed else ""
        print(f"stage 1: {len(problems)} problems from {args.dataset}/{args.split}, model {args.model} ({dtype_name} on {model.device}{ranks}), "
              f"{opts.batch_size} engine slots of {engine.max_len} positions", file=sys.stderr)
    summary = stage1(problems, tokenizer, engine, files, opts, model_name, targets, progress=not args.no_progress, world=world)
    if world.is_main:
        print(format_summary(summary))
        print(f"wrote {files.pairs}, {files.skipped.name}, {files.summary.name}" + (f", {files.targets.name}/" if targets else ""))
    return summary


def stage1(problems, tokenizer, engine, files: RunFiles, opts: Stage1Options, model_name: str,
           targets: CapturedTargets | None = None, progress: bool = True, world: dist.World = dist.World()) -> dict:
    """The loop: problems stream through the engine; a problem's rollouts are graded as soon as
    its K samples are done, its teacher request jumps the queue, and each record is written
    the moment it is decided. A rerun continues after the problems already written; under
    torchrun each rank runs this loop on its share of them (every rank-th problem left)."""
    stats, done, others = start_run(files, world)  # every rank has read the records before any writes
    stage = Stage1(tokenizer, files, opts, model_name, stats, targets, world)
    todo = dist.mine([p for p in problems if p.id not in done], world)
    summary_path = dist.write_path(files.summary, world)

    def kept() -> int:  # the pairs of all ranks together
        return stats.pairs + others.new()

    def feed():  # pulled lazily by the engine, whenever slots are free
        for p in todo:
            if kept() >= opts.num_pairs:
                return
            yield stage.rollout_request(p)

    bar = tqdm(total=len(todo), desc="stage 1", unit="problem", disable=not (progress and world.is_main), dynamic_ncols=True)
    bar.set_postfix(pairs=stats.pairs)
    try:
        for out in engine.run(feed()):
            if kept() >= opts.num_pairs:
                break  # enough pairs: problems still in flight stay undone
            kind, problem = out.request.tag[:2]
            if kind == "rollouts":
                teacher = stage.on_rollouts(problem, out.completions)  # graded; a mixed problem's teacher request
                if teacher is not None:
                    engine.add(teacher)
                    continue
            else:
                stage.on_teacher(out.request.tag, out.completions[0])  # judged, written as a pair or a skip
            bar.update(1)
            bar.set_postfix(pairs=kept())
            stats.save(summary_path)  # the time so far goes in each save: a killed session keeps its share
    except KeyboardInterrupt:
        if not world.distributed:
            merge_records(files, problems)  # in problem order; under torchrun other ranks may still append: the next start merges
        raise
    finally:
        bar.close()
    return finish_run(files, problems, stats, world)  # rank 0: the merged files and the run's summary


def main(argv=None) -> int:
    args = parse_with_recipe(build_parser(), argv, "sample")
    return run_main(lambda: sample(args))


if __name__ == "__main__":
    sys.exit(main())

"""SSB stage 4: accuracy of a base model and its LoRA adapters on GSM8K test, MATH-500 and AIME 2024.

    python eval.py --model Qwen/Qwen2.5-3B-Instruct --adapter runs/train/adapter --data-dir ../shared/data
    python eval.py --datasets aime24 --samples 16 --temperature 0.6 --adapter runs/train/adapter

Writes into --out (runs/eval by default), for the base model and each adapter x dataset:
    <label>__<dataset>.jsonl      every response with its extracted answer and verdict
    <label>__<dataset>.run.json   the generation arguments: a restart must match them
    results.json                  the table below as JSON
and prints a table: problems, accuracy with its 95% Wilson score interval, mean response
length in tokens and the difference to the base model. Killed and rerun with the same
arguments, it continues where it stopped; a larger --limit extends an earlier run.

    torchrun --nproc_per_node 8 eval.py --adapter runs/train/adapter

shards each dataset's problems over 8 ranks (one GPU each); rank 0 merges every responses file
in problem order and writes the table: the same files as one process (minissb/evaluate.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minissb.runs import DTYPE_HELP, DTYPE_NAMES, ArgumentParser, HelpFormatter, float_range, int_range, run_main
from minissb.recipes import add_recipe_argument, parse_with_recipe

# Literal copies (kept in sync by tests/test_eval_cli.py) so that --help imports no torch.
DATASET_NAMES = ("gsm8k", "math500", "aime24")
DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 1024, "math500": 2048, "aime24": 4096}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(  # one-line errors; the option types below check ranges while parsing
        description="Evaluate a model and LoRA adapters with the student prompt (SSB stage 4).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("models")
    g.add_argument("--model", default="Qwen/Qwen2.5-3B-Instruct", help="base model: HF-format directory or hub repo id")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--adapter", action="append", default=[], metavar="[LABEL=]DIR",
                   help="LoRA adapter directory (PEFT format, e.g. train.py's OUT/adapter); repeat for several. "
                        "Each is merged into freshly loaded base weights. LABEL names its rows and files "
                        "(default: the folder name)")
    g.add_argument("--no-base", action="store_true", help="evaluate only the adapters, not the base model")
    g.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help=DTYPE_HELP)
    g.add_argument("--device", default="auto", help="cuda, cuda:1, cpu, ... (auto: cuda when available)")
    g.add_argument("--cuda-graphs", action="store_true", help="capture the decode step in CUDA graphs (not yet measured on a GPU)")

    g = p.add_argument_group("data")
    g.add_argument("--datasets", default=",".join(DATASET_NAMES),
                   help=f"comma-separated, from {', '.join(DATASET_NAMES)} (GSM8K test split, MATH-500, AIME 2024)")
    g.add_argument("--data-dir", default=None,
                   help="folder of local hub mirrors named owner__name (e.g. ../shared/data); default: download from the hub")
    g.add_argument("--data", action="append", default=[], metavar="DATASET=PATH",
                   help="one dataset from a .jsonl/.parquet file or a hub-mirror folder; overrides --data-dir; repeatable")
    g.add_argument("--limit", type=int_range(1), default=None, help="only the first N problems of each dataset")

    g = p.add_argument_group("generation")
    g.add_argument("--samples", type=int_range(1), default=1,
                   help="samples per problem, k (needs --temperature > 0): reports avg@k, the mean share of right samples, and "
                        "maj@k, the majority answer (equivalent answers vote together, no answer = no vote, a tie goes to "
                        "the answer seen first); 1 = greedy pass@1")
    g.add_argument("--temperature", type=float_range(0), default=0.0, help="sampling temperature; 0 = greedy")
    g.add_argument("--top-k", type=int_range(0), default=None, help="top-k filter when sampling (0 or unset = off)")
    g.add_argument("--top-p", type=float_range(0, 1, low_open=True), default=None,
                   help="nucleus filter when sampling, in (0, 1] (unset or 1 = off)")
    caps = ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_NEW_TOKENS.items())
    g.add_argument("--max-new-tokens", type=int_range(1), default=None,
                   help=f"new-token cap per response for every dataset (default per dataset: {caps}; a cut-off response usually has no answer)")
    g.add_argument("--batch-size", type=int_range(1), default=64,
                   help="engine slots: sequences decoded together (a problem's samples take one each; at least --samples)")
    g.add_argument("--seed", type=int_range(0), default=0, help="sampling seed (greedy decoding ignores it)")
    g.add_argument("--system-prompt-file", default=None,
                   help="the system prompt every model sees, from a text file: the one the student was trained with (default: minissb's)")
    add_recipe_argument(g)

    g = p.add_argument_group("output")
    g.add_argument("--out", default="runs/eval", help="output directory for responses, run configs and results.json")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def evaluate(args) -> list[dict]:
    """Evaluate the base model and each adapter on each dataset; print and save the table."""
    import torch  # here, so that --help and bad options come without the wait for torch

    from minissb import dist, prompts
    from minissb.engine import Engine
    from minissb.evaluate import (add_deltas, check_adapters_fit, check_options, earlier_rows, eval_max_len, evaluate_dataset,
                                  finish_plan, format_table, load_eval_problems, make_targets, plan_runs, result_row,
                                  table_legend, tidy_outputs)
    from minissb.lora import load_adapter, merge_lora
    from minissb.model import from_pretrained, resolve_model_dir
    from minissb.runs import resolve_dtype_name, torch_device, torch_dtype, write_json_atomic
    from minissb.tokenizer import Tokenizer

    world, device_name = dist.setup(args.device)  # a world of one unless launched by torchrun
    # Everything that can be wrong with the inputs is found before the first token is generated.
    datasets, data_files, top_k, top_p = check_options(args)
    system_prompt = prompts.read_prompt_file(args.system_prompt_file, teacher=False) if args.system_prompt_file else None
    problems = load_eval_problems(datasets, args.data_dir, data_files, args.limit)
    targets = make_targets(args.adapter, include_base=not args.no_base)
    model_dir = resolve_model_dir(args.model)
    check_adapters_fit(model_dir, targets, args.model)
    tokenizer = Tokenizer.from_dir(args.tokenizer or model_dir)
    device = torch_device(device_name)
    dtype_name = resolve_dtype_name(args.dtype, device)
    plans = plan_runs(args, targets, problems, data_files, dtype_name, top_k, top_p, system_prompt)  # each reads its records
    out_dir = Path(args.out)
    dist.on_main(world, lambda: tidy_outputs(out_dir, plans))  # the barrier: all ranks have read the records before any writes
    share = {id(p): dist.mine([q for q in problems[p.dataset] if q.id not in p.done], world) for p in plans}

    results, model, pristine = [], None, False
    earlier = earlier_rows(out_dir / "results.json")  # the generation numbers of earlier sessions carry over
    for t in targets:
        if any(share[id(p)] for p in plans if p.target is t):
            # Each adapter goes onto freshly loaded base weights: unmerging a bf16 merge does not give the base
            # weights back bit for bit (minissb.lora), and reloading is cheap next to generation.
            if model is None or not pristine:
                model = None  # drop every reference to the old weights before loading new ones
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                model, pristine = from_pretrained(model_dir, dtype=torch_dtype(dtype_name), device=device), True
            if t.adapter is not None:
                merge_lora(load_adapter(model, t.adapter))  # base-model speed: no LoRA branch in the forward pass
                pristine = False
        for plan in (p for p in plans if p.target is t):
            session = {"new_problems": 0, "new_tokens": 0, "seconds": 0.0}
            if plan.todo and world.is_main:
                write_json_atomic(plan.config_path, plan.config)
            if share[id(plan)]:  # this rank's problems of the plan, appended to its part under torchrun
                engine = Engine(model, max(args.batch_size, args.samples), eval_max_len(tokenizer, problems[plan.dataset], plan.gen),
                                stop_ids=tokenizer.stop_ids, tokenizer=tokenizer, cuda_graphs=args.cuda_graphs)
                session = evaluate_dataset(share[id(plan)], tokenizer, engine, dist.write_path(plan.responses, world), plan.gen,
                                           not args.no_progress and world.is_main, desc=f"{t.label} {plan.dataset}")
                del engine  # its KV cache goes before the next model loads
            session = finish_plan(world, plan, problems[plan.dataset], session)  # rank 0: the merged file, all ranks' numbers
            if session is None:
                continue  # not rank 0: rank 0 writes the table
            if plan.todo:
                print(f"{t.label} {plan.dataset}: {session['new_problems']} problems, {session['new_tokens']} tokens "
                      f"in {session['seconds']:.1f} s ({session['new_tokens'] / max(session['seconds'], 1e-9):.1f} tokens/s)")
            results.append(result_row(plan, problems[plan.dataset], session, earlier.get(plan.responses.name)))
    if not world.is_main:
        return []

    results.sort(key=lambda r: datasets.index(r["dataset"]))  # stable: within a dataset, base first, then adapters in order
    add_deltas(results)
    print(format_table(results))
    print(table_legend(args.samples))
    write_json_atomic(out_dir / "results.json", {
        "model": args.model, "device": str(device), "dtype": dtype_name,
        "interval": "95% Wilson score interval over problems; paired_vs_base: paired bootstrap 95% interval of the difference",
        "results": results,
    })
    print(f"wrote {out_dir / 'results.json'}")
    return results


def main(argv=None) -> int:
    args = parse_with_recipe(build_parser(), argv, "eval")
    return run_main(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())

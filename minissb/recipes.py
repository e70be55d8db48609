"""Recipes: named sets of option defaults for sample.py, train.py and eval.py.

`minissb` (the default) is this project's choice of every setting; `original` is what the
authors' code (purbeshmitra/semantic-soft-bootstrapping at f153382: logit_gen.py, ssb_train.py)
effectively runs, setting by setting, with the file and line each value comes from. A recipe
only changes defaults: an option given on the command line still wins. The README's table
"minissb vs the original" lists every difference with the reason for ours.

The original's prompts are its authors' words, so they are not shipped here: `original`
requires --system-prompt-file (logit_gen.py line 91, `inf_prompt`) and, for sample.py,
--teacher-prompt-file (logit_gen.py lines 171-189, `ssb_prompt`, with its f-string fields
written as {question}, {correct} and {wrong}).
"""

from __future__ import annotations

import argparse

RECIPES = ("minissb", "original")

ORIGINAL = {
    "sample": {
        # logit_gen.py 113-122 and 203-211: generate() passes do_sample, top_k=50, temperature and
        # max_new_tokens=8192 only, so Qwen2.5-Instruct's generation_config.json supplies
        # top_p 0.8 and repetition_penalty 1.05.
        "num_rollouts": 4,  # logit_gen.py 80
        "rollout_temperature": 0.8,
        "teacher_temperature": 0.4,
        "top_k": 50,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
        "max_new_tokens": 8192,
        "teacher_max_new_tokens": 8192,
        "answer_rule": "exact",  # logit_gen.py 138-139, 218: boxed string == the text after "####"
        "gates": False,  # the original keeps every teacher solution with the right answer
    },
    "train": {
        "student_input": "flat",  # ssb_train.py 89, 213: " ".join(system, question) + reply, no chat template, no <|im_end|>
        "lr_schedule": "linear",  # ssb_train.py 391-402: Trainer defaults, linear decay, no warmup
        "warmup_ratio": 0.0,
    },
    "eval": {},  # the original has no evaluation code; its README: the system prompt + the raw question
}
NEEDS_FILES = {"sample": ("system_prompt_file", "teacher_prompt_file"), "train": (), "eval": ("system_prompt_file",)}


def add_recipe_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", choices=RECIPES, default="minissb",
                        help="default settings: minissb's, or the original SSB code's as it effectively ran "
                             "(README: 'minissb vs the original'); options given explicitly still win")


def parse_with_recipe(parser: argparse.ArgumentParser, argv, script: str) -> argparse.Namespace:
    """Parse argv with the chosen recipe's defaults; --recipe original checks its prompt files are given."""
    first, _ = parser.parse_known_args(argv)
    if first.recipe == "original":
        parser.set_defaults(**ORIGINAL[script])
    args = parser.parse_args(argv)
    if args.recipe == "original":
        missing = [name for name in NEEDS_FILES[script] if getattr(args, name, None) is None]
        if missing:
            flag = "--" + missing[0].replace("_", "-")
            parser.error(f"--recipe original needs {flag}: the original's prompt is its authors' text, not shipped "
                         "with minissb (README, 'minissb vs the original', says where in their code to find it)")
    return args


__all__ = ["RECIPES", "ORIGINAL", "add_recipe_argument", "parse_with_recipe"]

"""`lorafusion` command line: train, eval, plan, demo, report, squeeze."""

from __future__ import annotations

import argparse
import json
import sys

from lorafusion.config import DTYPES

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    import lorafusion as lf

    jobs, run = lf.load_config(args.config, args.set)
    result = lf.fit(jobs, run)
    failed = [j for j in result.jobs.values() if j.status != "finished"]
    print(result.summary())
    if not result.already_complete:
        print(f"outputs in {result.output_dir}")
    return 1 if failed else 0


def _eval(args: argparse.Namespace) -> int:
    import lorafusion as lf

    fields = dict(item.split("=", 1) for item in args.field if "=" in item)
    if len(fields) != len(args.field):
        raise ValueError(f"--field {args.field}: write each as KEY=COLUMN, e.g. --field prompt=question")
    result = lf.evaluate(args.base_model, args.adapter, args.dataset, max_seq_len=args.max_seq_len,
                         overflow=args.overflow, dtype=args.dtype, device=args.device, fields=fields or None)
    print(json.dumps({"loss": result.loss, "tokens": result.tokens}))
    return 0


def _squeeze(args: argparse.Namespace) -> int:
    import lorafusion as lf

    result = lf.squeeze(args.adapter, rank=args.rank, output_dir=args.output, base_model=args.base_model,
                        force=args.force, svd=args.svd)
    print(result.summary())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lorafusion.demo import run_demo

    run_demo(output_dir=args.output_dir, steps=args.steps, cache_dir=args.cache_dir, overwrite=args.overwrite)
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorafusion.demo import DEMO_MODEL
    from lorafusion.models.tiny import make_tiny_checkpoint

    directory = Path(args.directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not args.force:
        raise ValueError(f"'{directory}' already exists and is not an empty folder; choose another path, or pass "
                         "--force to write the tiny checkpoint's files into it")
    print(make_tiny_checkpoint(directory, **DEMO_MODEL))
    return 0


def _report(args: argparse.Namespace) -> int:
    from lorafusion.report import REPORT_DIR, render_summary, write_report

    report = write_report(args.output_dir)
    print(render_summary(report), end="")
    print(f"plots and summary.md in {report.output_dir / REPORT_DIR}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import dataclasses

    import lorafusion as lf
    from lorafusion.prepare import prepare_run
    from runtime.planning import format_run_plan, plan_windows
    from scheduler import CostModel, WindowPlanner

    if args.windows is not None and args.windows < 1:
        raise ValueError(f"--windows {args.windows} must be ≥ 1 (or left out to plan the whole run)")
    overrides = args.set + ([f"run.max_tokens_per_microbatch={args.capacity}"] if args.capacity is not None else [])
    jobs, run = lf.load_config(args.config, overrides)
    # Planning writes nothing, so an existing output_dir is no reason to refuse; the rest is checked as for train.
    prepared = prepare_run(jobs, dataclasses.replace(run, overwrite=True))
    # A job's consecutive global batches are stages x replicas microbatches apart, as `fit` plans them.
    planner = WindowPlanner(capacity_tokens=run.max_tokens_per_microbatch,
                            pipeline_depth=run.pipeline_stages * run.data_parallel,
                            pad_multiple=args.pad_multiple, time_limit_s=args.time_limit_s)
    cost_model = CostModel() if args.attn_coef is None else CostModel(attn_coef=args.attn_coef)
    result = plan_windows(prepared.jobs, planner, steps_per_window=args.steps_per_window,
                          stages=run.pipeline_stages, max_windows=args.windows, cost_model=cost_model,
                          replicas=run.data_parallel, balance=run.balance_pipeline)
    print(format_run_plan(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    from lorafusion import __version__

    parser = argparse.ArgumentParser(prog="lorafusion", description="Many LoRA fine-tuning jobs on one base model.")
    parser.add_argument("--version", action="version", version=f"lorafusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the jobs of a YAML file {run: ..., jobs: [...]}")
    train.add_argument("config", help="jobs YAML file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field: run.pipeline_stages=2 or jobs.<name>.learning_rate=1e-4")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="mean loss of a base model (+ adapter) on a dataset")
    ev.add_argument("base_model", help="HF checkpoint directory, or HF Hub id (org/name) in the HF cache")
    ev.add_argument("dataset", help="JSONL, Parquet or Arrow file, or a saved HF dataset folder (of a DatasetDict: "
                    "folder:split)")
    ev.add_argument("--field", action="append", default=[], metavar="KEY=COLUMN",
                    help="the dataset's column for a row key, as a job's fields: --field prompt=question")
    ev.add_argument("--adapter", default=None, help="PEFT adapter folder (default: the base model alone)")
    ev.add_argument("--max-seq-len", type=int, default=4096)
    ev.add_argument("--overflow", default="reject", choices=["reject", "truncate"])
    ev.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="compute dtype (auto: bfloat16 where the device multiplies it natively, else float32)")
    ev.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: the first GPU torch sees, else cpu)")
    ev.set_defaults(func=_eval)

    demo = sub.add_parser("demo", help="train 4 small jobs together on a tiny built-in model (CPU, ~2 min)")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per job (default: the demo's own)")
    demo.add_argument("--cache-dir", default=None, help="where the tiny checkpoint is made once (default ~/.cache/lorafusion)")
    demo.add_argument("--overwrite", action="store_true",
                      help="train from scratch even when the output dir holds a demo run (default: resume it)")
    demo.set_defaults(func=_demo)

    plan = sub.add_parser("plan", help="tokenize the jobs' datasets and print the schedule's statistics (no training)")
    plan.add_argument("config", help="jobs YAML file")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a field, as for train: run.pipeline_stages=4 plans for 4 stages")
    plan.add_argument("--windows", type=int, default=None, help="plan only the first N windows (default: the whole run)")
    plan.add_argument("--steps-per-window", type=int, default=None,
                      help="global batches of each job per window (default: as train chooses them)")
    plan.add_argument("--capacity", type=int, default=None,
                      help="tokens per microbatch (default: run.max_tokens_per_microbatch)")
    plan.add_argument("--pad-multiple", type=int, default=1, help="pad each job's tokens to a multiple (kernel tile rows)")
    plan.add_argument("--time-limit-s", type=float, default=0.3, help="CP-SAT limit per window (seconds)")
    plan.add_argument("--attn-coef", type=float, default=None,
                      help="attention cost per token² relative to one token, for the simulated bubble "
                           "(default: scheduler.CostModel's)")
    plan.set_defaults(func=_plan)

    tiny = sub.add_parser("tiny-checkpoint", help="write the demo's tiny random Llama checkpoint to a directory")
    tiny.add_argument("directory")
    tiny.add_argument("--force", action="store_true", help="write into a folder that already holds files")
    tiny.set_defaults(func=_tiny)
    squeeze = sub.add_parser("squeeze", help="compress an adapter (any variant) to the best rank-R plain LoRA "
                                             "(LoRA-Squeeze); prints the relative error per module")
    squeeze.add_argument("adapter", help="adapter folder (lorafusion's or PEFT's)")
    squeeze.add_argument("--rank", type=int, required=True, help="rank R of the squeezed LoRA")
    squeeze.add_argument("--output", required=True, help="folder for the squeezed PEFT LoRA")
    squeeze.add_argument("--base-model", default=None,
                         help="HF checkpoint folder or Hub id (default: the adapter's base_model_name_or_path)")
    squeeze.add_argument("--force", action="store_true", help="replace an output folder that already holds files")
    squeeze.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"],
                         help="SVD of dense updates (DoRA, SHiRA, RandLoRA); auto: randomized for large modules")
    squeeze.set_defaults(func=_squeeze)
    report = sub.add_parser("report", help="loss-curve PNGs and a throughput summary of a fit's output directory")
    report.add_argument("output_dir", help="the run.output_dir of a fit (holds run.json and <job>/metrics.jsonl)")
    report.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorafusion.result import FitInterrupted

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FitInterrupted as stopped:
        print(stopped.message, file=sys.stderr)
        return stopped.exit_code


if __name__ == "__main__":
    sys.exit(main())

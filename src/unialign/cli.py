"""``unialign`` command line: train, methods, data, eval, plot, demo."""

# Deferred imports: unialign torch (each command loads only what it runs: `unialign methods` or a
# mistyped option must answer without waiting seconds for torch and transformers).

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from unialign.allocator import own_process


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unialign`` console script."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and getattr(args, "func", None) is not _moved:  # a moved command's own options are not known here
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    own_process()
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = getattr(args, "debug", False) or os.environ.get("UNIALIGN_DEBUG", "") not in ("", "0")
    return run_command(args.func, args, debug=debug)


def run_command(func, args: argparse.Namespace, *, debug: bool = False, roots: tuple[str, ...] = ()) -> int:
    """Run one command's ``func(args)`` and turn what it raises into an exit code.

    A user's mistake (:func:`is_user_error`) ends in one line and exit 1 (or the error's own
    ``exit_code``), a bug in a traceback and exit 70, Ctrl-C in one line and exit 130; with ``debug``
    everything is re-raised. ``roots`` are further source folders (beside this package) whose own
    checks count as the user's mistakes: the repository's harnesses pass theirs.
    """
    try:
        return func(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: stopped by Ctrl-C; complete checkpoints in the run folder are kept "
              "(resume=true continues from the newest)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # sorted below into the user's mistakes and real bugs
        if debug:
            raise
        if not is_user_error(err, roots):
            traceback.print_exc()
            print(f"error: unexpected {type(err).__name__} (a bug in unialign or a library it calls; the traceback "
                  "is above, please report it)", file=sys.stderr)
            return EXIT_BUG
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USER)


EXIT_USER, EXIT_MOVED, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 70, 130  # 3 and 4 are the run folder's (unialign.rundir)
# The repository's harnesses, which live beside the package (a checkout's benchmarks/), not in it.
MOVED = {"bench": "python -m benchmarks.bench", "experiment": "python -m benchmarks.claims"}
_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def is_user_error(err: BaseException, roots: tuple[str, ...] = ()) -> bool:
    """Whether ``err`` is a mistake the user can fix (one line) rather than a bug (a traceback).

    Bad data, configs and run folders have their own types, and the file system's errors (a missing
    file, no space, no permission) are the user's to fix. A ``ValueError``, ``TypeError`` or
    ``RuntimeError`` counts when unialign itself (or code under one of ``roots``) raised it: those are its
    checks of what it was given.
    The same types raised deep inside torch or transformers, and errors such as ``KeyError`` or
    ``AttributeError``, are bugs and keep their traceback.
    """
    # Imported here: unialign.config loads transformers, which commands that never fail should not wait for.
    from unialign.config import ConfigError
    from unialign.data.errors import DataError

    if isinstance(err, (DataError, ConfigError, OSError)):
        return True
    if not isinstance(err, (ValueError, TypeError, RuntimeError)):
        return False
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return False
    filename = os.path.abspath(frame.tb_frame.f_code.co_filename)
    return any(filename.startswith(os.path.abspath(root) + os.sep) for root in (_PACKAGE, *roots))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="unialign", description="Align language models: UNA, RAO, TPO, DPO and more.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks (or set UNIALIGN_DEBUG=1)")
    sub = parser.add_subparsers(title="commands")

    train = sub.add_parser(
        "train",
        help="train with a YAML config",
        description="Train a model. Any config key can be "
        "overridden as key=value, e.g. `unialign train quickstart.yaml beta=0.1 max_steps=20`.",
    )
    train.add_argument("config", help="YAML config file")
    train.add_argument("overrides", nargs="*", help="key=value pairs that replace the file's values")
    train.add_argument("-v", "--verbose", action="store_true")
    train.set_defaults(func=_train)

    methods = sub.add_parser("methods", help="list methods with their data formats and defaults")
    methods.set_defaults(func=_methods)

    data = sub.add_parser("data", help="convert and build datasets").add_subparsers(title="data commands")
    convert = data.add_parser(
        "convert",
        help="convert a dataset to another feedback format",
        description="Convert UltraFeedback, HelpSteer2, listwise or TRL rows to another format.",
    )
    convert.add_argument("input", help="jsonl/json/parquet file, datasets folder or hub name")
    convert.add_argument("output", help="output file (.jsonl, .json or .parquet)")
    convert.add_argument("--to", required=True, help="pairwise | binary | score | triple | listwise | sft | prompt")
    convert.add_argument("--source", default="auto", help="input format (default: detected from the columns)")
    convert.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="converter option, e.g. mode=best_vs_random, threshold=0.5, reward_range=[0,10]",
    )
    convert.set_defaults(func=_data_convert)

    build = data.add_parser("build", help="sample k completions per prompt, score them, write every format")
    build.add_argument("--prompts", required=True, help="file of rows with a `prompt` column (and optional `id`)")
    build.add_argument("--model", default="smollm2-135m-instruct", help="model that writes the completions")
    build.add_argument("--reward", default="offline", help="offline | callable:module:function | reward-model:PATH")
    build.add_argument("--k", type=int, default=4, help="completions per prompt")
    build.add_argument("--out", required=True, help="output folder (re-running resumes)")
    build.add_argument("--max-new-tokens", type=int, default=256)
    build.add_argument("--temperature", type=float, default=0.9)
    build.add_argument("--top-p", type=float, default=0.95)
    build.add_argument("--heldout", type=float, default=0.2, help="fraction of prompts held out (by prompt)")
    build.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--batch-prompts",
        type=int,
        default=32,
        help="prompts sampled together (x k sequences); larger is faster on CPU",
    )
    build.set_defaults(func=_data_build)

    evaluate = sub.add_parser(
        "eval",
        help="compare a trained model with its reference under a judge",
        description="Generate on held-out prompts with both models; report mean reward, "
        "win/tie/loss, KL estimate, lengths and implicit-reward accuracy.",
    )
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_eval)

    plot = sub.add_parser("plot", help="draw a run's training curves into RUN_DIR/plots")
    add_plot_arguments(plot)
    plot.set_defaults(func=_plot)

    demo = sub.add_parser("demo", help="align the embedded SmolLM2-135M-Instruct with UNA-score and evaluate it")
    demo.add_argument("--output-dir", default="runs/demo")
    demo.add_argument("--eval-prompts", type=int, default=85, help="held-out prompts to evaluate on (85 = all)")
    demo.add_argument("overrides", nargs="*", help="training config overrides as key=value")
    demo.set_defaults(func=_demo)

    for name, command in MOVED.items():
        stub = sub.add_parser(name, help=f"moved out of the package: {command} from a checkout", add_help=False)
        stub.set_defaults(func=_moved, moved=(f"unialign {name}", command))
    card = data.add_parser("card", help="moved out of the package: python -m tools.bundled_card from a checkout",
                           add_help=False)
    card.set_defaults(func=_moved, moved=("unialign data card", "python -m tools.bundled_card"))
    return parser


def _train(args) -> int:
    from unialign.distributed import shut_down
    from unialign.pipeline import train

    result = train(args.config, **_overrides(args.overrides))
    shut_down()
    print(f"model saved to {result.model_dir}")
    print(f"metrics in {result.output_dir / 'metrics.jsonl'}")
    return 0


def _overrides(items: list[str]) -> dict:
    from unialign.config import parse_overrides

    return parse_overrides(items)


def _eval(args) -> int:
    from unialign.evaluate import run_eval_cli

    return run_eval_cli(args)


def _plot(args) -> int:
    from unialign.plots import run_plot_cli

    return run_plot_cli(args)


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``unialign eval`` arguments (the fields :func:`unialign.evaluate.run_eval_cli` reads) to ``parser``."""
    parser.add_argument("model", help="trained model folder or run directory (its model/ folder is used)")
    parser.add_argument("--reference", default=None,
                        help="reference model (default: the one named in the run's config.json)")
    from unialign.data.bundled import EVAL_PROMPTS

    parser.add_argument("--prompts", default=EVAL_PROMPTS,
                        help="rows with a `prompt` column: file, datasets folder or bundled:prompts[:split] "
                        f"(default: {EVAL_PROMPTS}, the held-out prompts)")
    parser.add_argument("--judge", default="offline",
                        help="reward source: offline | callable:module:function | reward-model:PATH")
    parser.add_argument("--out", default=None,
                        help="folder for eval.json and eval.md (default: <run dir>/eval or ./eval)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per completion")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 = greedy; 1 makes the KL estimate unbiased")
    parser.add_argument("--samples-per-prompt", type=int, default=1,
                        help="completions per prompt from each model (more than 1 needs --temperature > 0)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts (and pairs)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation and scoring batch")
    parser.add_argument("--beta", type=float, default=None,
                        help="β of the implicit reward β·log(π/π_ref) (default: the run's beta, else 0.1)")
    parser.add_argument("--pairs", default=None,
                        help="optional prompt/chosen/rejected rows for implicit-reward accuracy, "
                        "e.g. bundled:pairwise:test")
    return parser


def add_plot_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``unialign plot`` argument (``run_dir``) to ``parser``."""
    parser.add_argument("run_dir", help="training run directory holding metrics.jsonl; figures go to run_dir/plots")
    return parser



def _methods(args) -> int:
    from unialign.losses.registry import all_methods

    for method in all_methods():
        ref = "reference" if method.needs_reference else "no reference"
        defaults = ", ".join(f"{k}={v}" for k, v in method.defaults.items())
        print(f"{method.name:<14} {'/'.join(method.formats):<28} {ref:<13} {defaults}")
        print(f"{'':<14} {method.summary} [{method.paper}]")
    return 0


def _data_convert(args) -> int:
    from unialign.config import parse_overrides
    from unialign.data.converters import convert
    from unialign.data.io import write_rows
    from unialign.data.sources import read_rows

    result = convert(read_rows(args.input), to=args.to, source=args.source, **parse_overrides(args.option))
    write_rows(list(result.rows), args.output)
    print(result.summary())
    return 0


def _data_build(args) -> int:
    import torch

    from unialign.data.builder import build_dataset, check_build_options, check_prompt_rows
    from unialign.data.sources import read_rows
    from unialign.generation import GenerationConfig, check_distinct_samples
    from unialign.models import load_model, load_tokenizer
    from unialign.rewards.sources import load_reward

    # Every argument is checked before a model loads: a bad one must not cost a sampling pass.
    check_build_options(
        k=args.k, heldout_fraction=args.heldout, prompts_per_batch=args.batch_prompts,
        names={"k": "--k", "heldout_fraction": "--heldout", "prompts_per_batch": "--batch-prompts"},
    )
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1; got {args.limit}")
    generation = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_prompts,
    )
    check_distinct_samples(args.temperature, args.k, "--k", "--temperature")
    prompts = read_rows(args.prompts)[: args.limit]
    check_prompt_rows(prompts, args.prompts)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    counts = build_dataset(
        prompts,
        model,
        tokenizer,
        load_reward(args.reward),
        args.out,
        k=args.k,
        generation=generation,
        heldout_fraction=args.heldout,
        prompts_per_batch=args.batch_prompts,
    )
    for name, count in counts.items():
        print(f"{name:<20} {count} rows")
    return 0


def _moved(args) -> int:
    """A command that left the package: say where it went (nothing of the repository's harnesses is imported)."""
    old, new = args.moved
    print(f"error: `{old}` moved out of the package; from a checkout of the unialign repository run "
          f"`{new} ...` (see benchmarks/ and tools/)", file=sys.stderr)
    return EXIT_MOVED


def _demo(args) -> int:
    from unialign.demo import run_demo

    run_demo(args.output_dir, eval_prompts=args.eval_prompts, overrides=_overrides(args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())

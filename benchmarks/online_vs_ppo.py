"""Online UNA against TRL's online RL trainer on the same policy, reward, prompts and budget.

TRL 1.16 no longer ships ``PPOTrainer`` (neither in ``trl`` nor in ``trl.experimental``), so the peer
is TRL's ``RLOOTrainer`` (REINFORCE leave-one-out, Ahmadian et al. 2024, the baseline the UNA paper
cites next to PPO). Each side runs in its own subprocess so that its peak RSS is its own:

    python -m benchmarks.online_vs_ppo --steps 8 --prompts-per-step 4 --num-generations 4 --max-new-tokens 48

Both sides: the same policy (``smollm2-135m-instruct`` by default) loaded with
:func:`unialign.models.load_model`, the same reward (the offline judge, bounded [0, 1]), the same
bundled training prompts in the same order, the same batch (prompts × generations), completion
length, sampling temperature, learning rate and number of optimizer steps. Afterwards each policy
greedily answers the held-out bundled test prompts, scored by the same reward. A third subprocess
scores the untrained policy the same way. Results: a table on stdout and JSON in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine_info, run_sides

RESULTS = Path(__file__).parent / "results"


def held_out_reward(model, tokenizer, prompts: list, reward, max_new_tokens: int) -> float:
    """Mean reward of greedy completions of ``prompts``."""
    from unialign.generation import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, batch_size=8, repetition_penalty=1.0)
    texts = [group[0].text for group in generate(model, tokenizer, prompts, config, progress=False)]
    scores = reward(prompts, texts)
    return sum(scores) / len(scores)


def _prompts(split: str, limit: int | None) -> list:
    from unialign.data.bundled import load_bundled

    prompts = [row["prompt"] for row in load_bundled("prompt", split)]
    return prompts[:limit] if limit else prompts


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# TRL's default KL coefficient for RLOO, kept for the peer as in the first measurements.
RLOO_BETA = 0.05


def shared_settings(args, work: Path) -> dict:
    """The config keys both sides train with: model, prompts (in file order), reward, batch, sampling, steps."""
    data = work / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in _prompts("train", None)) + "\n", encoding="utf-8")
    return dict(
        model_name_or_path=args.model,
        dataset=str(data),
        reward="offline",
        learning_rate=args.lr,
        per_device_train_batch_size=args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        max_steps=args.steps,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",  # the prompts in file order on both sides
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=args.seed,
    )


def run_una(args, work: Path) -> dict:
    """Online UNA through ``unialign.train``; seconds per step from Trainer's ``train_runtime``."""
    import unialign
    from unialign.rewards.offline_judge import OfflineJudge

    result = unialign.train(dict(shared_settings(args, work), loss_type="una_online", reward_normalization="range",
                                 beta=args.una_beta, output_dir=str(work / "una")))
    runtime = result.metrics["train_runtime"]
    logs = [json.loads(x) for x in (work / "una" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    trainer = result.trainer  # the trained policy in memory, as for RLOO (no second copy loaded)
    heldout = held_out_reward(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class,
                              _prompts("test", args.heldout), OfflineJudge(), args.max_new_tokens)
    timing = {k: sum(x[k] for x in steps) / len(steps) for k in ("time/generation", "time/scoring", "time/update")}
    return {
        "seconds_per_step": runtime / args.steps,
        "train_reward_first": steps[0]["reward"],
        "train_reward_last": steps[-1]["reward"],
        "heldout_reward": heldout,
        **timing,
    }


def run_rloo(args, work: Path) -> dict:
    """TRL's RLOOTrainer as the claims sweep runs it (:mod:`benchmarks.claims.peers`), on the same settings."""
    from benchmarks.claims.peers import train_trl_rloo
    from unialign.rewards.offline_judge import OfflineJudge

    result = train_trl_rloo(dict(shared_settings(args, work), loss_type="trl_rloo", beta=RLOO_BETA,
                                 output_dir=str(work / "rloo")))
    trainer = result.trainer  # the trained policy in memory, as for online UNA
    steps = [x for x in trainer.state.log_history if "reward" in x]
    heldout = held_out_reward(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class,
                              _prompts("test", args.heldout), OfflineJudge(), args.max_new_tokens)
    return {
        "seconds_per_step": result.metrics["train_runtime"] / args.steps,
        "train_reward_first": steps[0]["reward"] if steps else None,
        "train_reward_last": steps[-1]["reward"] if steps else None,
        "heldout_reward": heldout,
    }


def run_base(args, work: Path) -> dict:
    """The untrained policy's held-out reward (the starting point of both)."""
    from unialign.models import load_model, load_tokenizer
    from unialign.rewards.offline_judge import OfflineJudge

    model, tokenizer = load_model(args.model), load_tokenizer(args.model)
    return {"heldout_reward": held_out_reward(model, tokenizer, _prompts("test", args.heldout), OfflineJudge(),
                                              args.max_new_tokens)}


RUNNERS = {"una_online": run_una, "trl_rloo": run_rloo, "initial_policy": run_base}


def child(args) -> None:
    """Run one side in this process and print its result as JSON on the last line."""
    import torch

    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        result = RUNNERS[args.child](args, Path(work))
        result["wall_seconds"] = time.perf_counter() - start
    result["peak_rss_mib"] = _peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run every side in a subprocess, print a table and write benchmarks/results/online_<stamp>.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--una-beta", type=float, default=0.03)
    parser.add_argument("--heldout", type=int, default=24, help="held-out test prompts to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="initial_policy,una_online,trl_rloo")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/online_<time>.json)")
    parser.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    given = list(argv if argv is not None else sys.argv[1:])
    forwarded, results = run_sides("benchmarks.online_vs_ppo", given, args.sides)
    import torch

    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "machine": machine_info("cuda" if torch.cuda.is_available() else "cpu", torch.get_num_threads()),
        "command": "python -m benchmarks.online_vs_ppo " + " ".join(forwarded),
        "results": results,
    }
    print(f"{'side':<16}{'s/step':>9}{'peak RSS MiB':>14}{'held-out reward':>17}")
    for side, r in results.items():
        sps = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        print(f"{side:<16}{sps:>9}{r['peak_rss_mib']:>14.0f}{r['heldout_reward']:>17.4f}")
    out = Path(args.out) if args.out else RESULTS / f"online_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

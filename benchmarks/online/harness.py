"""The online benchmark's runner: one subprocess per method, then the table and the PPO memory account.

    python -m benchmarks.online --steps 3 --prompts-per-step 2 --num-generations 4 --max-new-tokens 24 --heldout 8
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine_info, run_sides

RESULTS = Path(__file__).resolve().parent.parent / "results"
METHODS = ("una_online", "ppo", "grpo", "rloo")
PHASES = ("generation", "scoring", "old_logps", "reference", "value", "update")
MIB = 2**20


def _prompts(split: str, limit: int | None = None) -> list:
    from unialign.data.bundled import load_bundled

    prompts = [row["prompt"] for row in load_bundled("prompt", split)]
    return prompts[:limit] if limit else prompts


def bootstrap_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (resampling prompts)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choice(values) for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def held_out(model, tokenizer, prompts: list, max_new_tokens: int) -> dict:
    """Greedy completions of ``prompts`` scored by the offline judge: mean, 95% interval, per-prompt values."""
    from unialign.generation import GenerationConfig, generate
    from unialign.rewards.offline_judge import OfflineJudge

    config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0, batch_size=8, repetition_penalty=1.0)
    texts = [group[0].text for group in generate(model, tokenizer, prompts, config, progress=False)]
    scores = OfflineJudge()(prompts, texts)
    low, high = bootstrap_interval(scores)
    return {"heldout_reward": sum(scores) / len(scores), "heldout_ci95": [low, high], "heldout_scores": scores}


def settings(args, work: Path, method: str) -> dict:
    """The config every method trains with; only the method and its own keys differ."""
    data = work / "prompts.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p}) for p in _prompts("train")) + "\n", encoding="utf-8")
    config = dict(
        loss_type=method,
        model_name_or_path=args.model,
        dataset=str(data),
        reward="offline",
        learning_rate=args.lr,
        per_device_train_batch_size=args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        max_steps=args.steps,
        num_iterations=1,
        num_ppo_epochs=1,
        num_mini_batches=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        train_sampling_strategy="sequential",
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=args.seed,
        output_dir=str(work / method),
    )
    own = {"una_online": {"reward_normalization": "range", "beta": args.una_beta},
           "grpo": {"beta": args.kl}, "rloo": {"beta": args.kl}, "ppo": {"kl_coef": args.kl}}
    return config | own[method]


def peak_memory_mib() -> dict:
    """Peak resident memory of this process, and peak CUDA memory when a GPU was used."""
    import torch

    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / MIB
    return out


def value_model_account(trainer) -> dict:
    """PPO's extra memory from its parts, counted from the tensors: value weights, gradients, AdamW state."""
    value = trainer.value_model
    params = list(value.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)  # every trainable tensor holds a gradient at peak
    state = 0
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    for p in trainable:
        for tensor in optimizer.state.get(p, {}).values():
            if hasattr(tensor, "numel") and tensor.dim() > 0:
                state += tensor.numel() * tensor.element_size()
    activations = value_activation_bytes(trainer)
    return {"value_params": sum(p.numel() for p in params), "value_trainable": sum(p.numel() for p in trainable),
            "value_weights_mib": weights / MIB, "value_grads_mib": grads / MIB, "value_adam_state_mib": state / MIB,
            "value_activations_mib": activations / MIB,
            "value_total_mib": (weights + grads + state + activations) / MIB}


def value_activation_bytes(trainer) -> int:
    """Bytes the value model's forward keeps for its backward on one rollout of the run's size.

    A fresh rollout is sampled (same prompts per step and generations) and the tensors autograd saves during
    the value model's forward are counted through ``saved_tensors_hooks`` (each storage once).
    """
    import torch

    batch = trainer.make_rollout(trainer.model, list(range(trainer.args.per_device_train_batch_size))).batch
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in trainer.value_model.parameters()}
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.value_model.completion_values(batch, batch.tok_index, batch.tok_mask)
    return sum(size for ptr, size in seen.items() if ptr not in params)  # weights are counted already


def run_method(args, work: Path, method: str) -> dict:
    """Train one method and score it on the held-out prompts."""
    import unialign

    result = unialign.train(settings(args, work, method))
    logs = [json.loads(x) for x in (work / method / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in logs if "loss" in x]
    out = {
        "seconds_per_step": result.metrics["train_runtime"] / args.steps,
        "phases": {p: sum(x.get(f"time/{p}", 0.0) for x in steps) / len(steps) for p in PHASES},
        "train_reward": [x.get("reward") for x in steps],
        "kl": [x.get("kl", x.get("kl/sequence")) for x in steps],
        "entropy": [x.get("entropy") for x in steps],
    }
    trainer = result.trainer
    if trainer.value_model is not None:
        out["memory_account"] = value_model_account(trainer)
    policy = trainer.accelerator.unwrap_model(trainer.model)
    out |= held_out(policy, trainer.processing_class, _prompts("test", args.heldout), args.max_new_tokens)
    return out


def run_initial(args, work: Path) -> dict:
    """The untrained policy's held-out reward (every method's starting point)."""
    from unialign.models import load_model, load_tokenizer

    return held_out(load_model(args.model), load_tokenizer(args.model), _prompts("test", args.heldout),
                    args.max_new_tokens)


def child(args) -> None:
    """Run one side in this process and print its result as JSON on the last line."""
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        if args.child == "initial_policy":
            result = run_initial(args, Path(work))
        else:
            result = run_method(args, Path(work), args.child)
        result["wall_seconds"] = time.perf_counter() - start
    result |= peak_memory_mib()
    print("RESULT " + json.dumps(result), flush=True)


def memory_check(results: dict) -> dict | None:
    """PPO's measured extra peak memory over GRPO against the sum of its value model's parts."""
    ppo, grpo = results.get("ppo"), results.get("grpo")
    if not ppo or not grpo or "memory_account" not in ppo:
        return None
    key = "peak_cuda_mib" if "peak_cuda_mib" in ppo else "peak_rss_mib"
    measured = ppo[key] - grpo[key]
    explained = ppo["memory_account"]["value_total_mib"]
    return {"measure": key, "measured_extra_mib": measured, "explained_mib": explained,
            "relative_error": (measured - explained) / explained if explained else None}


def main(argv: list[str] | None = None) -> int:
    """Run every side in a subprocess, print the tables and write benchmarks/results/online_rl_<stamp>.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=2)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--una-beta", type=float, default=0.03)
    parser.add_argument("--kl", type=float, default=0.05, help="GRPO/RLOO beta and PPO kl_coef")
    parser.add_argument("--heldout", type=int, default=8, help="held-out test prompts to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sides", default="initial_policy," + ",".join(METHODS))
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/online_rl_<time>.json)")
    parser.add_argument("--child", choices=("initial_policy", *METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    given = list(argv if argv is not None else sys.argv[1:])
    forwarded, results = run_sides("benchmarks.online", given, args.sides)
    import torch

    report = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
        "machine": machine_info("cuda" if torch.cuda.is_available() else "cpu", torch.get_num_threads()),
        "command": "python -m benchmarks.online " + " ".join(forwarded),
        "results": results,
        "ppo_memory": memory_check(results),
    }
    print_report(report)
    out = Path(args.out) if args.out else RESULTS / f"online_rl_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def print_report(report: dict) -> None:
    """The markdown tables docs/online.md shows."""
    results = report["results"]
    memory = "peak CUDA MiB" if any("peak_cuda_mib" in r for r in results.values()) else "peak RSS MiB"
    print(f"| method | s/step | {' | '.join(PHASES)} | {memory} | held-out reward [95% CI] |")
    print("|---" * (4 + len(PHASES)) + "|")
    for side, r in results.items():
        phases = " | ".join(f"{r['phases'][p]:.2f}" for p in PHASES) if "phases" in r else " | ".join("-" * len(PHASES))
        sps = f"{r['seconds_per_step']:.2f}" if "seconds_per_step" in r else "-"
        mem = r.get("peak_cuda_mib", r["peak_rss_mib"])
        low, high = r["heldout_ci95"]
        print(f"| {side} | {sps} | {phases} | {mem:.0f} | {r['heldout_reward']:.4f} [{low:.4f}, {high:.4f}] |")
    check = report.get("ppo_memory")
    if check:
        account = results["ppo"]["memory_account"]
        print(f"\nPPO value model: {account['value_params']:,} parameters ({account['value_trainable']:,} trainable): "
              f"weights {account['value_weights_mib']:.0f} MiB + gradients {account['value_grads_mib']:.0f} MiB + "
              f"AdamW state {account['value_adam_state_mib']:.0f} MiB + activations "
              f"{account['value_activations_mib']:.0f} MiB = {account['value_total_mib']:.0f} MiB; "
              f"measured PPO − GRPO ({check['measure']}): {check['measured_extra_mib']:.0f} MiB "
              f"({100 * check['relative_error']:+.1f}%)")

"""Online UNA, PPO, GRPO and RLOO side by side on unialign's one rollout path (``python -m benchmarks.online``).

Every method trains the same policy (the embedded ``smollm2-135m-instruct`` by default) on the same bundled
training prompts in the same order, with the same reward (the offline judge, bounded [0, 1]), the same
rollout size (prompts × generations), completion length, sampling temperature, learning rate, seed and
number of optimizer steps, each making one optimizer pass per rollout (``num_iterations`` 1,
``num_ppo_epochs`` 1, ``num_mini_batches`` 1), so every method samples the same number of completions.
Each method runs in its own subprocess so that its peak memory is its own. Afterwards each policy
greedily answers held-out bundled test prompts scored by the same reward, with a bootstrap 95% interval
over prompts; the untrained policy is scored the same way.

Reported per method: seconds per step, split by phase (generation, scoring, old log-probs, reference,
value, update, from the ``time/*`` metrics), peak memory (RSS on CPU, ``max_memory_allocated`` on GPU),
held-out reward with its interval. PPO's extra memory over GRPO (same settings, no value model) is
explained from its parts: value-model parameters, their gradients, AdamW's two moment buffers and the
activations its forward saves for backward on one rollout, counted from the tensors themselves, against
the measured difference of peak memory.
"""

"""Online training (docs/online.md): sample completions, score them with reward sources, update the policy.

``unialign.train({"loss_type": "una_online" | "ppo" | "grpo" | "rloo", "reward": ..., ...})`` lands here;
see docs/online.md.
"""

from unialign.online.trainer import OnlineTrainer, OnlineUnaTrainer, train_online

__all__ = ["OnlineTrainer", "OnlineUnaTrainer", "train_online"]

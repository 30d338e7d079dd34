"""Online UNA (docs/online.md): sample completions, score them with a reward source, regress the implicit reward.

``unialign.train({"loss_type": "una_online", "reward": ..., ...})`` lands here; see docs/online.md.
"""

from unialign.online.trainer import OnlineUnaTrainer, train_online

__all__ = ["OnlineUnaTrainer", "train_online"]

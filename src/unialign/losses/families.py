"""Imports every offline loss family so that each registers its methods."""

from unialign.losses import (  # noqa: F401
    dpo,
    kto,
    rao,
    reference_free,
    reward_model,
    sft,
    tpo,
    una,
)

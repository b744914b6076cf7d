"""mmalign.losses: pure loss functions (tensors in, tensors and metrics out).

- ``dpo.py``: the DPO family (DPO, IPO, cDPO, SimPO, DDPO, MM-DPO) — ``LossType`` with capability
  properties, ``sequence_scores``/``score_kwargs``, ``dynamic_beta``, ``preference_loss``, ``sft_nll``.
- ``align_tokens`` (re-exported from ``mmalign.data.align``): changed/unchanged tokens for DDPO.
"""

from __future__ import annotations

from mmalign.data.align import align_tokens
from mmalign.losses.dpo import (
    LossType,
    ScoreKwargs,
    dynamic_beta,
    preference_loss,
    score_kwargs,
    sequence_scores,
    sft_nll,
)

__all__ = [
    "LossType",
    "ScoreKwargs",
    "align_tokens",
    "dynamic_beta",
    "preference_loss",
    "score_kwargs",
    "sequence_scores",
    "sft_nll",
]

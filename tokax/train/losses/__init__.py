"""Training losses, one pure function each, selected by name.

    from tokax.train.losses import get_loss, LOSS_INFO, PreferenceBatch
    loss, metrics = get_loss("dpo")(batch, beta=0.1)

Every loss is `fn(batch, **hyperparameters) -> (loss_scalar, metrics)`:

| name         | batch            | paper (module)                                  | reference |
|--------------|------------------|-------------------------------------------------|-----------|
| sft          | TokenBatch       | token NLL + PaLM z-loss (sft)                   | no        |
| distill      | TokenBatch       | KL(teacher || student), Hinton et al. (distill) | teacher   |
| dpo          | PreferenceBatch  | Rafailov et al. 2023 (dpo)                      | yes       |
| cdpo         | PreferenceBatch  | conservative DPO, Mitchell 2023 (dpo)           | yes       |
| robust_dpo   | PreferenceBatch  | Chowdhury et al. 2024 (dpo)                     | yes       |
| ipo          | PreferenceBatch  | Azar et al. 2023 (ipo)                          | yes       |
| hinge        | PreferenceBatch  | SLiC-HF, Zhao et al. 2023 (slic)                | yes       |
| simpo        | PreferenceBatch  | Meng et al. 2024 (simpo)                        | no        |
| orpo         | PreferenceBatch  | Hong et al. 2024 (orpo)                         | no        |
| kto          | UnpairedBatch    | Ethayarajh et al. 2024 (kto)                    | yes       |
| bco          | UnpairedBatch    | Jung et al. 2024 (bco)                          | yes       |
| tdpo1, tdpo2 | PreferenceBatch  | Zeng et al. 2024 (tdpo)                         | yes + KL  |
| treg         | PreferenceBatch  | Zhou et al. 2024 (treg)                         | yes       |

`LOSS_INFO[name]` says which batch fields a loss reads, which per-step
inputs it takes besides hyperparameters (KTO's `kl_estimate`, BCO's
`delta`) and what else it needs from the train step (a teacher, KTO's
mismatched pairs, BCO's running mean, T-REG's contrastive rewards, TDPO's
KL with gradient, a head over a token subset): see `LossInfo`. Validate
host batches with `validate_batch(batch, name)`; inside jit use
`check_finite(loss, metrics)`.
"""

from __future__ import annotations

from tokax.train.losses.bco import RunningMean, bco_loss, bco_rewards, update_running_mean
from tokax.train.losses.common import (
    LossInfo,
    PreferenceBatch,
    TokenBatch,
    UnpairedBatch,
    assert_finite,
    check_finite,
)
from tokax.train.losses.distill import distill_loss
from tokax.train.losses.dpo import cdpo_loss, dpo_loss, robust_dpo_loss
from tokax.train.losses.ipo import ipo_loss
from tokax.train.losses.kto import kto_kl_estimate, kto_loss
from tokax.train.losses.orpo import orpo_loss
from tokax.train.losses.sft import sft_loss
from tokax.train.losses.simpo import simpo_loss
from tokax.train.losses.slic import hinge_loss
from tokax.train.losses.tdpo import tdpo1_loss, tdpo2_loss
from tokax.train.losses.registry import LOSS_INFO, LOSSES, get_loss
from tokax.train.losses.treg import contrastive_token_rewards, treg_loss
from tokax.train.losses.validate import (
    validate_batch,
    validate_preference_batch,
    validate_token_batch,
    validate_unpaired_batch,
)

__all__ = [
    "LOSSES",
    "LOSS_INFO",
    "LossInfo",
    "get_loss",
    "TokenBatch",
    "PreferenceBatch",
    "UnpairedBatch",
    "validate_batch",
    "validate_preference_batch",
    "validate_unpaired_batch",
    "validate_token_batch",
    "check_finite",
    "assert_finite",
    "sft_loss",
    "distill_loss",
    "dpo_loss",
    "cdpo_loss",
    "robust_dpo_loss",
    "ipo_loss",
    "hinge_loss",
    "simpo_loss",
    "orpo_loss",
    "kto_loss",
    "kto_kl_estimate",
    "bco_loss",
    "bco_rewards",
    "RunningMean",
    "update_running_mean",
    "tdpo1_loss",
    "tdpo2_loss",
    "treg_loss",
    "contrastive_token_rewards",
]

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

`LOSS_INFO[name]` says which batch fields a loss reads and which per-step
inputs it takes besides hyperparameters (KTO's `kl_estimate`, BCO's
`delta`). Validate host batches with `validate_batch(batch, name)`; inside
jit use `check_finite(loss, metrics)`.
"""

from __future__ import annotations

from collections.abc import Callable

from tokax.train.losses.bco import RunningMean, bco_loss, bco_rewards, update_running_mean
from tokax.train.losses.common import (
    LossInfo,
    PreferenceBatch,
    TokenBatch,
    UnpairedBatch,
    assert_finite,
    check_finite,
    validate_batch,
    validate_preference_batch,
    validate_token_batch,
    validate_unpaired_batch,
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
from tokax.train.losses.treg import contrastive_token_rewards, treg_loss

_SEQ = ("chosen_logps", "rejected_logps", "chosen_counts", "rejected_counts")
_REF = ("ref_chosen_logps", "ref_rejected_logps")
_UNPAIRED = ("logps", "ref_logps", "counts", "desirable")
_TREG = (
    "chosen_token_logratios",
    "rejected_token_logratios",
    "chosen_token_rewards",
    "rejected_token_rewards",
    "chosen_mask",
    "rejected_mask",
)

LOSSES: dict[str, Callable] = {
    "sft": sft_loss,
    "distill": distill_loss,
    "dpo": dpo_loss,
    "cdpo": cdpo_loss,
    "robust_dpo": robust_dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "kto": kto_loss,
    "bco": bco_loss,
    "tdpo1": tdpo1_loss,
    "tdpo2": tdpo2_loss,
    "treg": treg_loss,
}

LOSS_INFO: dict[str, LossInfo] = {
    "sft": LossInfo("token", ("mask", "token_logps"), False, paper="PaLM z-loss (Chowdhery et al. 2022)"),
    "distill": LossInfo("token", ("mask", "token_kl"), False, paper="Hinton et al. 2015"),
    "dpo": LossInfo("paired", _SEQ + _REF, True, paper="Rafailov et al. 2023"),
    "cdpo": LossInfo("paired", _SEQ + _REF, True, paper="Mitchell 2023"),
    "robust_dpo": LossInfo("paired", _SEQ + _REF, True, paper="Chowdhury et al. 2024"),
    "ipo": LossInfo("paired", _SEQ + _REF, True, paper="Azar et al. 2023"),
    "hinge": LossInfo("paired", _SEQ + _REF, True, paper="Zhao et al. 2023 (SLiC-HF)"),
    "simpo": LossInfo("paired", _SEQ, False, paper="Meng et al. 2024"),
    "orpo": LossInfo("paired", _SEQ, False, paper="Hong et al. 2024"),
    "kto": LossInfo("unpaired", _UNPAIRED, True, ("kl_estimate",), paper="Ethayarajh et al. 2024"),
    "bco": LossInfo("unpaired", _UNPAIRED, True, ("delta",), paper="Jung et al. 2024"),
    "tdpo1": LossInfo("paired", _SEQ + _REF + ("chosen_kl", "rejected_kl"), True, paper="Zeng et al. 2024"),
    "tdpo2": LossInfo("paired", _SEQ + _REF + ("chosen_kl", "rejected_kl"), True, paper="Zeng et al. 2024"),
    "treg": LossInfo("paired", _SEQ + _TREG, True, paper="Zhou et al. 2024"),
}


def get_loss(name: str) -> Callable:
    """The loss function registered under `name` (see LOSSES)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None


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

"""The loss registry: every loss function by name (``LOSSES``) and what it declares it needs
from the trainer (``LOSS_INFO``, a ``LossInfo`` each)."""

from __future__ import annotations

from collections.abc import Callable

from tokax.train.losses.bco import bco_loss
from tokax.train.losses.common import LossInfo
from tokax.train.losses.distill import distill_loss
from tokax.train.losses.dpo import cdpo_loss, dpo_loss, robust_dpo_loss
from tokax.train.losses.ipo import ipo_loss
from tokax.train.losses.kto import kto_loss
from tokax.train.losses.orpo import orpo_loss
from tokax.train.losses.sft import sft_loss
from tokax.train.losses.simpo import simpo_loss
from tokax.train.losses.slic import hinge_loss
from tokax.train.losses.tdpo import tdpo1_loss, tdpo2_loss
from tokax.train.losses.treg import TOKEN_FIELDS, treg_loss

_SEQ = ("chosen_logps", "rejected_logps", "chosen_counts", "rejected_counts")
_REF = ("ref_chosen_logps", "ref_rejected_logps")
_UNPAIRED = ("logps", "ref_logps", "counts", "desirable")
_KL = ("chosen_kl", "rejected_kl")
_TREG = TOKEN_FIELDS

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
    "distill": LossInfo("token", ("mask", "token_kl"), False, paper="Hinton et al. 2015", needs_teacher=True,
                        head_subset=True),
    "dpo": LossInfo("paired", _SEQ + _REF, True, paper="Rafailov et al. 2023"),
    "cdpo": LossInfo("paired", _SEQ + _REF, True, paper="Mitchell 2023"),
    "robust_dpo": LossInfo("paired", _SEQ + _REF, True, paper="Chowdhury et al. 2024"),
    "ipo": LossInfo("paired", _SEQ + _REF, True, paper="Azar et al. 2023"),
    "hinge": LossInfo("paired", _SEQ + _REF, True, paper="Zhao et al. 2023 (SLiC-HF)"),
    "simpo": LossInfo("paired", _SEQ, False, paper="Meng et al. 2024"),
    "orpo": LossInfo("paired", _SEQ, False, paper="Hong et al. 2024"),
    "kto": LossInfo("unpaired", _UNPAIRED, True, ("kl_estimate",), paper="Ethayarajh et al. 2024",
                    needs_kl_pairs=True),
    "bco": LossInfo("unpaired", _UNPAIRED, True, ("delta",), paper="Jung et al. 2024", needs_running_mean=True),
    "tdpo1": LossInfo("paired", _SEQ + _REF + _KL, True, paper="Zeng et al. 2024", needs_kl_grad=True),
    "tdpo2": LossInfo("paired", _SEQ + _REF + _KL, True, paper="Zeng et al. 2024", needs_kl_grad=True),
    "treg": LossInfo("paired", _SEQ + _TREG, True, paper="Zhou et al. 2024", needs_contrastive_rewards=True),
}


def get_loss(name: str) -> Callable:
    """The loss function registered under `name` (see LOSSES)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None

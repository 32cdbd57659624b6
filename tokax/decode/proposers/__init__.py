"""Draft proposers for speculative decoding: chains (``tokax.decode.speculative``) and token
trees (``tokax.decode.tree_speculative``).

Every proposer subclasses ``ChainProposer`` or ``TreeProposer`` (``tokax.decode.proposers.base``,
which documents the protocol and every optional hook with its default), is a frozen
(hashable) dataclass so that a jitted loop takes it as a static argument, and keeps its
state in an explicit pytree. ``tparams`` are the target's params (self-speculative drafts
reuse its layers), ``pparams`` the proposer's own (a draft model, an adapter, heads, a
datastore; ``None`` when it has none). One module per method:

| module            | proposer(s)                                 | paper / idea                         |
|-------------------|---------------------------------------------|--------------------------------------|
| draft_model       | DraftModelProposer                          | Leviathan et al.; Chen et al. 2023   |
| ngram             | PromptLookupProposer, ANPDProposer          | prompt lookup; adaptive n-gram (ANPD)|
| retrieval         | RetrievalProposer, RetrievalTreeProposer    | REST (datastore chain and trie)      |
| kangaroo          | KangarooProposer                            | Kangaroo (self-draft + adapter)      |
| specdec_pp        | SpecDecPPProposer                           | SpecDec++ (acceptance head)          |
| lookahead         | LookaheadProposer                           | lookahead decoding (Jacobi n-grams)  |
| blockwise         | BlockwiseProposer                           | blockwise parallel decoding / Medusa |
| draft_tree        | DraftTreeProposer                           | a fixed tree from a draft (SpecInfer)|
| dyspec            | DySpecProposer                              | DySpec (dynamic tree)                |
| spectr            | SpecTrProposer                              | SpecTr (k i.i.d. chains)             |
| token_recycling   | TokenRecyclingProposer                      | Token Recycling                      |
| medusa            | MedusaTreeProposer                          | Medusa (heads' top-k tree)           |

``tokax.decode.methods`` builds any of them by name from a config block.
"""

from __future__ import annotations

from tokax.decode.proposers.base import ChainProposer, Context, Proposal, TreeProposer  # noqa: F401


from tokax.decode.proposers.weights import load_params, save_asset, save_params  # noqa: E402,F401
from tokax.decode.proposers.blockwise import BlockwiseProposer  # noqa: E402
from tokax.decode.proposers.draft_model import DraftModelProposer  # noqa: E402
from tokax.decode.proposers.draft_tree import (  # noqa: E402
    DraftTreeProposer,
    template_depths,
    template_from_branching,
    template_ranks,
)
from tokax.decode.proposers.dyspec import DySpecProposer  # noqa: E402
from tokax.decode.proposers.kangaroo import KangarooProposer  # noqa: E402
from tokax.decode.proposers.lookahead import LookaheadProposer  # noqa: E402
from tokax.decode.proposers.medusa import MedusaTreeProposer  # noqa: E402
from tokax.decode.proposers.ngram import ANPDProposer, PromptLookupProposer  # noqa: E402
from tokax.decode.proposers.retrieval import RetrievalProposer, RetrievalTreeProposer  # noqa: E402
from tokax.decode.proposers.specdec_pp import SpecDecPPProposer  # noqa: E402
from tokax.decode.proposers.spectr import SpecTrProposer  # noqa: E402
from tokax.decode.proposers.token_recycling import TokenRecyclingProposer  # noqa: E402

__all__ = [
    "ANPDProposer",
    "BlockwiseProposer",
    "ChainProposer",
    "Context",
    "DraftModelProposer",
    "DraftTreeProposer",
    "DySpecProposer",
    "KangarooProposer",
    "LookaheadProposer",
    "MedusaTreeProposer",
    "PromptLookupProposer",
    "Proposal",
    "RetrievalProposer",
    "RetrievalTreeProposer",
    "SpecDecPPProposer",
    "SpecTrProposer",
    "TokenRecyclingProposer",
    "TreeProposer",
    "load_params",
    "save_params",
    "template_depths",
    "template_from_branching",
    "template_ranks",
]

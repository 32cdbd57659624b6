"""Job: token-tree speculative decoding of a prompts file with Gemma 3 270M as the
target (``configs/tree.py``, methods draft_tree, dyspec, token_recycling, spectr);
output as the speculative job (text, or JSON lines with ``stats``)."""

from __future__ import annotations

from tokax.jobs import check, check_decoding
from tokax.jobs.speculative import check_tree_keys, decode_prompts, screen_option

METHODS = ("draft_tree", "dyspec", "token_recycling", "spectr")


def validate(c) -> None:
    check_decoding(c)
    check(c.method in METHODS, "method", c.method, f"use one of {', '.join(METHODS)}")
    check_tree_keys(c)


def run(c) -> list[dict]:
    """Tree speculative decoding of every prompt in ``c.prompts_file``."""
    from tokax.decode.proposers.tree_proposers import make_tree_proposer
    from tokax.decode.tree_speculative import TreeSpeculativeGenerator

    validate(c)

    def make_generator(cfg, params, tok):
        prop, pparams = make_tree_proposer(
            c.method, cfg, params, draft=c.draft, draft_layers=c.draft_layers, branching=tuple(c.branching), n_nodes=c.n_nodes,
            rounds=c.rounds, max_children=c.max_children, table_k=c.table_k, spectr_k=c.spectr_k,
            spectr_length=c.spectr_length)
        return TreeSpeculativeGenerator(cfg, params, prop, pparams, tok,
                                        greedy_screen=screen_option(c, cfg))

    return decode_prompts(c, make_generator)

"""`make demo`: Gemma 3 270M on the bundled prompts, with tokens/s, then a comparison of
plain greedy decoding with speculative methods on the same prompts."""

from configs.generate import get_config as _generate


def get_config(arg=None):
    c = _generate(arg)
    c.job = "demo"
    c.batch_size = 1  # one prompt at a time, so the progress bar moves
    # After plain decoding, the same prompts with these speculative methods (greedy, lossless):
    # a table of tokens/s, speedup, tokens per target pass and identity to plain output.
    # retrieval: prompt lookup, else the n-gram datastore of the standard library and of Gemma's own greedy
    # continuations of it; retrieval_tree: the same
    # sources and the datastore's runner-up as one token tree; draft: the shipped distilled draft.
    # Each runs with its defaults (tokax.decode.methods; configs/speculative.py has the blocks).
    c.compare_methods = ("prompt_lookup", "retrieval", "retrieval_tree", "anpd", "draft", "medusa")
    return c

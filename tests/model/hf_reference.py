"""HF transformers' Gemma3ForCausalLM on the same GGUF file: the reference
for tokax's real-model logits. Used by the fixture script and the live test
(both need the `bench` extra: torch==2.13.0 and transformers)."""

from __future__ import annotations

import numpy as np

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived",
    "import os\nimport sys\n\nfor name in sorted(os.listdir(sys.argv[1])):\n",
    "Die Katze sitzt auf der Matte und",
    "Question: What is 17 times 3?\nAnswer:",
]


def load_hf():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokax.model.loaders.gguf import gemma3_gguf_path

    path = gemma3_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return tok, model


def hf_outputs(n_new: int = 64):
    """Per prompt: HF's token ids, last-position logits [V] and greedy continuation."""
    import torch

    tok, model = load_hf()
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, return_tensors="pt").input_ids
            logits = model(ids).logits[0, -1].float().numpy()
            gen = model.generate(ids, max_new_tokens=n_new, do_sample=False)  # stops at EOS, as tokax does
            out.append(
                dict(prompt=p, ids=ids[0].numpy().astype(np.int64), logits=logits, greedy=gen[0, ids.shape[1]:].numpy())
            )
    return out

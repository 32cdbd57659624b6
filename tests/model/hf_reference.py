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


def hf_outputs(n_new: int = 64, loaded=None, n_greedy: int | None = None):
    """Per prompt: HF's token ids, last-position logits [V] and greedy continuation
    (``loaded``: ``load_hf()``'s pair, when the caller has it already; ``n_greedy``: decode
    only the first N prompts, the rest get ``greedy=None``)."""
    import torch

    tok, model = loaded or load_hf()
    out = []
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = tok(p, return_tensors="pt").input_ids
            logits = model(ids).logits[0, -1].float().numpy()
            greedy = None
            if n_greedy is None or i < n_greedy:
                gen = model.generate(ids, max_new_tokens=n_new, do_sample=False)  # stops at EOS, as tokax does
                greedy = gen[0, ids.shape[1]:].numpy()
            out.append(dict(prompt=p, ids=ids[0].numpy().astype(np.int64), logits=logits, greedy=greedy))
    return out


def hf_draft(target, draft_params: dict, layers: list[int]):
    """The distilled draft (``tokax.decode.proposers.distilled``) as an HF ``Gemma3ForCausalLM``
    for HF assisted generation: the target's config cut to ``len(layers)`` layers, the draft's
    LoRA-merged projections and norms in tokax layout (``draft_params['decoder']``) copied in,
    the target's embedding and final norm. The tokax draft scores only its 16k-token head subset;
    an HF assistant needs full-vocabulary logits, so this one keeps the tied full head."""
    import copy

    import torch
    from transformers import Gemma3ForCausalLM

    cfg = copy.deepcopy(target.config)
    cfg.num_hidden_layers = len(layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[j] for j in layers]
    model = Gemma3ForCausalLM(cfg).to(torch.float32).eval()
    sd = {k: v for k, v in target.state_dict().items() if not k.startswith("model.layers.")}
    t = lambda x: torch.from_numpy(np.array(x, np.float32))  # noqa: E731  (a writable copy)
    for i in range(len(layers)):
        p = draft_params["decoder"][f"layer_{i}"]
        D = p["q"].shape[0]
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = t(np.asarray(p["q"]).reshape(D, -1).T)
        sd[pre + "self_attn.k_proj.weight"] = t(np.asarray(p["k"]).reshape(D, -1).T)
        sd[pre + "self_attn.v_proj.weight"] = t(np.asarray(p["v"]).reshape(D, -1).T)
        sd[pre + "self_attn.o_proj.weight"] = t(np.asarray(p["o"]).reshape(-1, D).T)
        sd[pre + "self_attn.q_norm.weight"] = t(p["q_norm"])
        sd[pre + "self_attn.k_norm.weight"] = t(p["k_norm"])
        sd[pre + "mlp.gate_proj.weight"] = t(np.asarray(p["gate"]).T)
        sd[pre + "mlp.up_proj.weight"] = t(np.asarray(p["up"]).T)
        sd[pre + "mlp.down_proj.weight"] = t(np.asarray(p["down"]).T)
        sd[pre + "input_layernorm.weight"] = t(p["attn_norm"])
        sd[pre + "post_attention_layernorm.weight"] = t(p["post_attn_norm"])
        sd[pre + "pre_feedforward_layernorm.weight"] = t(p["ffn_norm"])
        sd[pre + "post_feedforward_layernorm.weight"] = t(p["post_ffn_norm"])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"HF draft: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model

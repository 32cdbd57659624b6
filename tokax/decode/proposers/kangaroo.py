"""Kangaroo: lossless self-speculative decoding via double early exiting (Liu et al. 2024).

The draft is the target's own first ``l`` layers, a small trained adapter and
the target's LM head (final norm + tied embedding):

    q(. | x) = softmax(W_emb · Norm(Adapter(Layers_{<l}(x))))

Drafting stops early (the second "early exit") once the draft's confidence,
its top-1 probability ``max_v q(v)`` (softmax of the raw draft logits, no
temperature), falls below a threshold: the token just drawn is still
proposed, further ones are not.

Here the adapter is one Gemma block (attention + GeGLU FFN with the target's
widths) appended as layer ``l`` of a decoder whose layers ``< l`` are the
target's, and the draft keeps its own KV cache for those ``l + 1`` layers.
``attention_only`` switches the block's FFN off, which gives the paper's
adapter (attention and its norms). Deviation from the paper: the paper reuses
the shallow layers' features of the drafted tokens in the verify pass (saving
``l / L`` of it); here the target recomputes them. With the adapter's output
projections at zero (``init_adapter(identity=True)``) the draft is plain early
exit after ``l`` layers.

Params: a bare adapter block, or ``with_subset_head``'s dict, which adds the
draft's own final norm and/or an LM head restricted to a token subset (the
shipped Gemma adapter has both). Training: ``train_adapter`` distils the
adapter from the frozen target (KL over the full vocabulary);
``train_adapter_greedy`` fits it to the target's greedy tokens on the target's
own text (``experiments/train_kangaroo_adapter.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import optax

from tokax.decode.proposers.draft_model import DraftModelProposer, draft_forward
from tokax.model.heads import is_subset_head, subset_head_params
from tokax.model.config import ModelConfig
from tokax.model.decoder import Block, Params, forward


@dataclasses.dataclass(frozen=True)
class KangarooProposer(DraftModelProposer):
    """``cfg`` is the draft's config (``KangarooProposer.make`` derives it
    from the target's); ``pparams`` is the adapter's params."""

    n_shallow: int = 2
    threshold: float = 0.6  # stop drafting after a token whose draft top-1 prob < threshold

    @classmethod
    def make(cls, target_cfg: ModelConfig, n_shallow: int = 2, k: int = 6, threshold: float = 0.6):
        if not 1 <= n_shallow < target_cfg.n_layers:
            raise ValueError(
                f"kangaroo n_shallow={n_shallow} must be in [1, {target_cfg.n_layers - 1}] "
                "(fewer layers than the target)"
            )
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"kangaroo threshold={threshold} must be in [0, 1]")
        cfg = target_cfg.replace(n_layers=n_shallow + 1, name=f"{target_cfg.name}-kangaroo{n_shallow}")
        return cls(cfg=cfg, k=k, n_shallow=n_shallow, threshold=threshold)

    def draft_params(self, tparams: Params, adapter: Any) -> Params:
        if not is_packed(adapter):  # a bare adapter block
            return kangaroo_params(tparams, adapter, self.n_shallow)
        # {"adapter", optional "final_norm", optional "head_ids" + "head_w"} (``with_subset_head``)
        dec = kangaroo_params(tparams, adapter["adapter"], self.n_shallow)
        if "final_norm" in adapter:
            dec["final_norm"] = adapter["final_norm"]
        return dict(adapter, decoder=dec) if is_subset_head(adapter) else dec

    def continue_after(self, q_logits: jax.Array) -> jax.Array:
        conf = jnp.max(jax.nn.softmax(q_logits.astype(jnp.float32), axis=-1), axis=-1)  # [B]
        return conf >= self.threshold


def kangaroo_params(tparams: Params, adapter: Params, n_shallow: int) -> Params:
    """Decoder params of the self-draft: the target's embedding, final norm and
    first ``n_shallow`` layers, with the adapter as the last layer."""
    out = {"embed": tparams["embed"], "final_norm": tparams["final_norm"], f"layer_{n_shallow}": adapter}
    for i in range(n_shallow):
        out[f"layer_{i}"] = tparams[f"layer_{i}"]
    return out


def is_packed(pparams: Any) -> bool:
    """Whether Kangaroo params are the dict form ``{"adapter": block, ...}`` (else a bare block)."""
    return isinstance(pparams, dict) and "adapter" in pparams


def with_subset_head(tparams: Params, adapter: Params, head_ids: jax.Array | None = None,
                     final_norm: jax.Array | None = None) -> dict:
    """Kangaroo params in dict form. ``head_ids`` (sorted, distinct): the draft head covers
    only these tokens, the target's embedding rows for them gathered once
    (``draft_model.subset_head_params``). A draft step then costs ``len(head_ids)`` dot
    products instead of the whole vocabulary, which on a CPU is the difference between a
    cheap and a useless draft; q(v) = 0 outside the subset, so verification stays exact.
    ``final_norm``: the draft's own final-norm weights in place of the target's (the paper's
    adapter has its own norms; trained, they also set the scale, so the confidence the early
    stop reads is calibrated)."""
    out: dict = {"adapter": adapter}
    if final_norm is not None:
        out["final_norm"] = jnp.asarray(final_norm)
    if head_ids is not None:
        sub = subset_head_params({"embed": tparams["embed"]}, head_ids)
        out.update(head_ids=sub["head_ids"], head_w=sub["head_w"])
    return out


def attention_only(adapter: Params) -> Params:
    """The adapter with its FFN switched off (gate, up and down at zero: the block adds
    nothing after its attention). The paper's adapter is one attention layer and its norms;
    ``train_adapter_greedy(attention_only=True)`` keeps the FFN at zero while training."""
    return dict(adapter, **{k: jnp.zeros_like(adapter[k]) for k in FFN_KEYS})


FFN_KEYS = ("gate", "up", "down")


def load_adapter(path: str, target_cfg: ModelConfig, tparams: Params, n_shallow: int) -> Any:
    """Kangaroo params from a ``.npz`` (``save_params``): a bare adapter, or
    ``{"adapter", "head_ids", "final_norm"}`` as ``experiments/train_kangaroo_adapter.py``
    writes it, which becomes ``with_subset_head``'s dict. The adapter is cast to the target's dtype and
    must be layer ``n_shallow``'s shape (and, where the file says, trained after ``n_shallow``
    layers)."""
    from tokax.decode.proposers.weights import load_params

    tree = load_params(path)
    if "n_shallow" in tree and int(tree["n_shallow"]) != n_shallow:
        raise ValueError(f"{path} was trained on the first {int(tree['n_shallow'])} layers, not {n_shallow} "
                         f"(set kangaroo_layers={int(tree['n_shallow'])})")
    adapter = tree.get("adapter", tree)
    want = jax.eval_shape(lambda k: init_adapter(target_cfg, n_shallow, k), jax.random.PRNGKey(0))
    bad = sorted(set(adapter) ^ set(want)) or sorted(k for k in want if adapter[k].shape != want[k].shape)
    if bad:
        raise ValueError(f"{path}: not a Kangaroo adapter for {target_cfg.name} (mismatched: {bad})")
    adapter = {k: v.astype(target_cfg.jnp_dtype) for k, v in adapter.items()}
    if "head_ids" not in tree and "final_norm" not in tree:
        return adapter
    norm = tree.get("final_norm")
    return with_subset_head(tparams, adapter, tree.get("head_ids"),
                            None if norm is None else norm.astype(target_cfg.jnp_dtype))


def init_adapter(target_cfg: ModelConfig, n_shallow: int, rng: jax.Array, identity: bool = True) -> Params:
    """Params of the adapter block (layer ``n_shallow`` of the draft). With
    ``identity=True`` its attention-output and FFN-down projections are zero,
    so the block passes its input through and the draft starts as plain early
    exit; otherwise all weights are random (tests)."""
    cfg = target_cfg.replace(n_layers=n_shallow + 1)
    x = jnp.zeros((1, 1, cfg.d_model), cfg.jnp_dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    params = Block(cfg, n_shallow).init(rng, x, pos, None, None, None)["params"]
    if identity:
        params = dict(params, o=jnp.zeros_like(params["o"]), down=jnp.zeros_like(params["down"]))
    return params


def distill_loss(proposer: KangarooProposer, target_cfg: ModelConfig, tparams: Params, adapter: Params,
                 tokens: jax.Array) -> jax.Array:
    """Mean over positions of KL(p_target || q_draft) on ``tokens [B, T]``
    (teacher forcing, no cache): the adapter's training objective."""
    B, T = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    p_logits, _, _ = forward(target_cfg, jax.lax.stop_gradient(tparams), tokens, pos)
    q_logits, _, _ = forward(proposer.cfg, proposer.draft_params(jax.lax.stop_gradient(tparams), adapter), tokens, pos)
    logp = jax.nn.log_softmax(p_logits, -1)
    logq = jax.nn.log_softmax(q_logits, -1)
    return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), -1))


def train_adapter(
    proposer: KangarooProposer,
    target_cfg: ModelConfig,
    tparams: Params,
    adapter: Params,
    batches: Iterable[jax.Array],
    learning_rate: float = 1e-3,
) -> tuple[Params, list[float]]:
    """Distil the adapter on token batches ``[B, T]`` (the target frozen) with
    Adam; returns the trained adapter and the loss per step."""
    opt = optax.adam(learning_rate)
    state = opt.init(adapter)

    @jax.jit
    def step(adapter, state, tokens, tparams):  # tparams an argument: never baked in as constants
        loss, g = jax.value_and_grad(lambda a: distill_loss(proposer, target_cfg, tparams, a, tokens))(adapter)
        upd, state = opt.update(g, state, adapter)
        return optax.apply_updates(adapter, upd), state, loss

    losses = []
    for tokens in batches:
        adapter, state, loss = step(adapter, state, jnp.asarray(tokens), tparams)
        losses.append(float(loss))
    return adapter, losses


def greedy_scores(proposer: KangarooProposer, tparams: Params, pparams: Any, tokens: jax.Array,
                  lengths: jax.Array, at: jax.Array, targets: jax.Array):
    """The draft at positions ``at [B, J]`` of ``tokens [B, L]`` (right-padded, ``lengths [B]``
    real tokens) against ``targets [B, J]``, the target model's greedy next tokens there:
    ``(nll, valid, agree)``, each ``[B, J]``. ``nll`` is the draft's negative log-likelihood of
    the target's token, ``valid`` whether the draft's head holds that token (always, with the
    full head), ``agree`` whether the draft's own greedy token is it."""
    from tokax.model.decoder import padded_positions, unembed

    dp = proposer.draft_params(jax.lax.stop_gradient(tparams), pparams)
    _, hidden, _ = draft_forward(proposer.cfg, dp, tokens, padded_positions(lengths, tokens.shape[1]),
                                 return_logits=False)
    h = jnp.take_along_axis(hidden, at[:, :, None], axis=1)  # [B, J, D]
    if is_subset_head(dp):
        ids = dp["head_ids"]
        logits = jnp.einsum("bjd,sd->bjs", h, jax.lax.stop_gradient(dp["head_w"]), preferred_element_type=jnp.float32)
        idx = jnp.clip(jnp.searchsorted(ids, targets), 0, ids.shape[0] - 1)
        valid, pick = ids[idx] == targets, ids[jnp.argmax(logits, -1)]
    else:
        logits = unembed(proposer.cfg, dp, h)
        idx, valid, pick = targets, jnp.ones(targets.shape, bool), jnp.argmax(logits, -1)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), idx[..., None], -1)[..., 0]
    return nll, valid, pick == targets


def greedy_ce_loss(proposer: KangarooProposer, tparams: Params, pparams: Any, tokens: jax.Array,
                   lengths: jax.Array, at: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean ``greedy_scores`` NLL over the valid positions: the adapter's objective for greedy
    decoding when the target's own greedy text is the data
    (``tokax.data.greedy.greedy_code_pairs``), so no target pass is needed. With a subset head,
    targets outside the subset are left out of the mean."""
    nll, valid, _ = greedy_scores(proposer, tparams, pparams, tokens, lengths, at, targets)
    valid = valid.astype(jnp.float32)
    return jnp.sum(valid * nll) / jnp.maximum(jnp.sum(valid), 1.0)


def train_adapter_greedy(
    proposer: KangarooProposer,
    tparams: Params,
    pparams: Any,
    batches: Iterable[tuple],
    learning_rate: float = 1e-3,
    attention_only: bool = True,
) -> tuple[Any, list[float]]:
    """Fit the adapter of ``pparams`` (a bare adapter, or ``with_subset_head``'s dict, whose
    ``final_norm`` is trained too) by ``greedy_ce_loss`` on batches ``(tokens, lengths, at,
    targets)`` with Adam, the target frozen; ``attention_only`` keeps the FFN's weights where
    they are (zero after ``attention_only(...)``). Returns the params and the loss per step."""
    packed = is_packed(pparams)
    train = {"adapter": pparams["adapter"] if packed else pparams}
    if packed and "final_norm" in pparams:
        train["final_norm"] = pparams["final_norm"]
    frozen = {k: attention_only and k in FFN_KEYS for k in train["adapter"]}

    def full(t):
        return dict(pparams, **t) if packed else t["adapter"]

    opt = optax.adam(learning_rate)
    state = opt.init(train)

    @jax.jit
    def step(train, state, tparams, batch):
        loss, g = jax.value_and_grad(lambda t: greedy_ce_loss(proposer, tparams, full(t), *batch))(train)
        g["adapter"] = {k: (jnp.zeros_like(v) if frozen[k] else v) for k, v in g["adapter"].items()}
        upd, state = opt.update(g, state, train)
        return optax.apply_updates(train, upd), state, loss

    losses = []
    for batch in batches:
        train, state, loss = step(train, state, tparams, tuple(jnp.asarray(b) for b in batch))
        losses.append(float(loss))
    return full(train), losses

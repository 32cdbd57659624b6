"""Helpers shared by tokax's tests, benchmarks and notebooks (no pytest import here).

``load_config(path, overrides)``: a config file's ``get_config(arg)`` with dotted-key
overrides applied, as ``--config.KEY=VALUE`` flags would (lists become tuples), and
``cli_overrides(overrides)``: the same overrides as ``--config.KEY=VALUE`` arguments.

Byte-level references (for ``tokax.decode.byte_level``): ``toy_byte_vocab()`` and
``toy_byte_model()``, a 330-piece BPE and a random tiny decoder over it;
``ByteOracle``, exact byte probabilities by enumerating token sequences, with
``brute_valid`` (validity decided by sentencepiece) and ``batch_logits``; ``random_params``
and ``random_toy_texts``.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["load_config", "cli_overrides"]


def load_config(path: str, overrides: Mapping[str, Any] | None = None, arg: str | None = None):
    spec = importlib.util.spec_from_file_location("_tokax_test_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    for key, val in (overrides or {}).items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = tuple(val) if isinstance(val, list) else val
    return c


def cli_overrides(overrides: Mapping[str, Any]) -> list[str]:
    return [f"--config.{k}={tuple(v) if isinstance(v, list) else v}" for k, v in overrides.items()]


# ------------------------------------------------- byte-level references (tests of tokax.decode.byte_level)
# A toy vocabulary and model small enough to enumerate token sequences, and the
# brute-force answers the byte-level code is checked against. jax, sentencepiece
# and tokax.model are imported inside the functions, so loading this module stays light.

TOY_WORDS = (
    "the cat sat on the mat . then the cats ate the hat ; that hat is the best hat "
    "thereafter . café naïve über the theme then"
).split()


@functools.lru_cache(maxsize=None)
def toy_spm_proto(vocab_size: int = 330, lines: int = 400, words: int = 12, seed: int = 0) -> bytes:
    """A byte-fallback BPE sentencepiece model (`vocab_size` pieces, 256 of them bytes) trained
    on `lines` random lines of `words` `TOY_WORDS` each, which writes text as is, like Gemma's:
    no dummy prefix, identity normalizer. The defaults make `toy_byte_vocab()`'s."""
    import sentencepiece as spm

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(TOY_WORDS) for _ in range(words)) for _ in range(lines)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0,
        pad_id=-1, minloglevel=2,
    )
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def toy_byte_vocab():
    """The `ByteVocab` of `toy_spm_proto()` (cached: one object per process)."""
    from tokax.tokenize.byte_vocab import ByteVocab

    return ByteVocab(toy_spm_proto())


TOY_ALPHABET = list("thecasmoniöжé .;") + ["\u4e2d"]  # ö, ж and 中 are not in the toy vocabulary: byte fallback


def random_toy_texts(n: int, seed: int = 0, max_len: int = 12) -> list[str]:
    """`n` random strings over `TOY_ALPHABET`, 1 to `max_len` characters long."""
    rng = random.Random(seed)
    return ["".join(rng.choice(TOY_ALPHABET) for _ in range(rng.randint(1, max_len))) for _ in range(n)]


def random_params(cfg, seed: int = 0):
    """`init_params`, with the norm weights perturbed too so that (1 + w) is exercised."""
    import jax

    from tokax.model.decoder import init_params

    params = init_params(cfg, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [a + 0.3 * jax.random.normal(k, a.shape, a.dtype) if a.ndim == 1 else a for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, leaves)


@functools.lru_cache(maxsize=1)
def toy_byte_model():
    """``(cfg, params)``: a random tiny decoder over `toy_byte_vocab()`."""
    from tokax.model import config as mc

    cfg = mc.tiny(vocab_size=toy_byte_vocab().vocab_size)
    return cfg, random_params(cfg, seed=3)


@functools.lru_cache(maxsize=1)
def _batch_logits_fn():
    import jax
    import jax.numpy as jnp

    from tokax.model.decoder import forward

    @functools.partial(jax.jit, static_argnums=(0,))
    def batch_logits(cfg, params, tokens):
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        lg, _, _ = forward(cfg, params, tokens, pos)
        return lg

    return batch_logits


def batch_logits(cfg, params, tokens):
    """Logits ``[B, T, V]`` of ``tokens [B, T]`` from one cache-free forward (positions 0..T-1)."""
    return _batch_logits_fn()(cfg, params, tokens)


def brute_valid(v, ids: list[int]) -> bool:
    """Is `ids` a prefix of sentencepiece's encoding of some text (`v` a `ByteVocab`)? A
    trailing incomplete character is completed by trying every character that starts with it."""
    sp = v.sp
    pieces = [sp.id_to_piece(i) for i in ids]
    if any(sp.is_control(i) or sp.is_unknown(i) for i in ids):
        return False
    data = b"".join(bytes([int(p[3:5], 16)]) if sp.is_byte(i) else p.replace("\u2581", " ").encode() for p, i in zip(pieces, ids))
    try:
        return sp.encode(data.decode("utf-8")) == ids
    except UnicodeDecodeError as e:
        if e.reason != "unexpected end of data":
            return False
        head, frag = data[: e.start], data[e.start :]
        # Try every character whose UTF-8 starts with the fragment, in code point order.
        n = 2 if frag[0] >> 5 == 6 else 3 if frag[0] >> 4 == 14 else 4
        lo = hi = frag[0] & (0x7F >> n)
        for k in range(1, n):
            c = frag[k] & 0x3F if k < len(frag) else None
            lo = (lo << 6) | (0 if c is None else c)
            hi = (hi << 6) | (0x3F if c is None else c)
        for cp in range(lo, min(hi, 0x10FFFF) + 1):
            if 0xD800 <= cp <= 0xDFFF:
                continue
            cb = chr(cp).encode("utf-8")
            if not cb.startswith(frag):
                continue
            want = ids + [sp.piece_to_id(f"<0x{b:02X}>") for b in cb[len(frag) :]]
            if sp.encode(head.decode("utf-8") + chr(cp)) == want:
                return True
        return False


class ByteOracle:
    """Exact byte-level probabilities by brute force over token sequences after BOS, in float64.

    Every token sequence whose bytes are consistent with the text is enumerated
    (all segmentations, byte tokens included) and scored with the model's next-token
    log-probs from cache-free forwards; validity is decided by sentencepiece itself
    (`brute_valid`), and Q is summed over the covers. For vocabularies of a few hundred
    pieces and texts of a few bytes.
    """

    def __init__(self, vocab, cfg, params, renormalize: bool = True):
        self.v, self.cfg, self.params = vocab, cfg, params
        self.renormalize = renormalize
        self._logq: dict[tuple[int, ...], np.ndarray] = {}

    def logp(self, seqs: list[tuple[int, ...]]) -> None:
        """Fill the cache of log Q(next | seq) for all `seqs` (one batched forward)."""
        todo = [s for s in dict.fromkeys(seqs) if s not in self._logq]
        if not todo:
            return
        L = 16
        toks = np.zeros((len(todo), L), np.int32)
        for k, s in enumerate(todo):
            toks[k, : len(s) + 1] = (self.v.bos_id,) + s
        lg = np.asarray(batch_logits(self.cfg, self.params, toks), np.float64)
        for k, s in enumerate(todo):
            row = lg[k, len(s)]
            lp = row - np.logaddexp.reduce(row)
            if not self._valid(s):  # Q(s) = 0: nothing after it counts
                self._logq[s] = np.full_like(lp, -np.inf)
                continue
            valid = np.array([self._valid(s + (t,)) for t in range(self.v.vocab_size)])
            lq = np.where(valid, lp, -np.inf)
            if self.renormalize:
                lq -= np.logaddexp.reduce(lq[valid])
            self._logq[s] = lq

    @functools.lru_cache(maxsize=None)
    def _valid(self, seq: tuple[int, ...]) -> bool:
        v = self.v
        if seq and seq[-1] in v.stop_ids:
            body = v.decode(seq[:-1])
            try:
                body.decode("utf-8")
            except UnicodeDecodeError:
                return False
            return brute_valid(v, list(seq[:-1]))
        return brute_valid(v, list(seq))

    def log_q_seq(self, seq: tuple[int, ...]) -> float:
        """log Q of the token sequence `seq` (after BOS)."""
        self.logp([seq[:k] for k in range(len(seq))])
        return float(sum(self._logq[seq[:k]][seq[k]] for k in range(len(seq))))

    def next_byte(self, x: bytes) -> tuple[np.ndarray, float]:
        """Unnormalized P(x b) for b in 0..255, P(x, end) at 256; and P(x) = sum over covers."""
        from tokax.tokenize.byte_vocab import SPECIAL, STOP

        v = self.v
        n = len(x)
        internal = []
        stack = [()]
        while stack:  # every token sequence whose bytes are a prefix of x
            s = stack.pop()
            internal.append(s)
            y = v.decode(s)
            for t in range(v.vocab_size):
                if v.kinds[t] != SPECIAL and x.startswith(y + v.token_bytes[t]):
                    stack.append(s + (t,))
        self.logp(internal)
        out = np.zeros(257)
        p_x = 1.0 if n == 0 else 0.0
        for s in internal:
            y = v.decode(s)
            w = math.exp(self.log_q_seq(s)) if s else 1.0
            if w == 0:
                continue
            lq = self._logq[s]
            if len(y) == n:
                out[STOP] += w * sum(math.exp(lq[e]) for e in v.stop_ids)
                if s:
                    p_x += w  # covers ending exactly at the end of x
            for t in range(v.vocab_size):
                b = v.token_bytes[t]
                if lq[t] == -np.inf or not b:
                    continue
                y2 = y + b
                if len(y2) > n and y2.startswith(x):
                    out[y2[n]] += w * math.exp(lq[t])
                    if len(y) < n:
                        p_x += w * math.exp(lq[t])
        return out, p_x


__all__ += ["TOY_WORDS", "toy_spm_proto", "toy_byte_vocab", "TOY_ALPHABET", "random_toy_texts", "random_params",
            "toy_byte_model", "batch_logits", "brute_valid", "ByteOracle"]


# ------------------------------------------------- speculative decoding references (tests of the decode loops)
# A tiny random target over 8 tokens (sampled distributions are enumerable), a tiny draft, ragged
# prompts, the exact distribution of sampled continuations, the chi-square test, verifiers that
# are deliberately wrong (negative controls), and every registered method built on the tiny target.

TINY_VOCAB = 8
SUBSET = [0, 2, 3, 5, 6]  # a draft head over these tokens only: q = 0 elsewhere
SAMPLE_PROMPT = [3, 5, 2, 7, 3, 5, 2, 6, 3, 5]  # repeats, so n-gram lookups find drafts
N_SAMPLED = 3  # tokens whose joint distribution is tested (8**3 = 512 cells)


def numpy_init(shapes, seed: int, embed_std: float = 0.15):
    """Random params for a tree of ShapeDtypeStructs, drawn in numpy (no compile): matrices
    ~ N(0, 1/fan_in), norm weights ~ N(0, 0.3^2) so that (1 + w) is exercised, and a small
    embedding so that next-token distributions are far from one-hot (sampling tests need spread)."""
    import jax
    import jax.numpy as jnp

    rs = np.random.RandomState(seed)

    def one(path, a):
        name = jax.tree_util.keystr(path[-1:])
        if a.ndim == 1:
            x = 0.3 * rs.randn(*a.shape)
        elif "embed" in name:
            x = embed_std * rs.randn(*a.shape)
        else:
            fan_in = a.shape[0] * a.shape[1] if "'o'" in name else a.shape[0]
            x = rs.randn(*a.shape) / np.sqrt(fan_in)
        return jnp.asarray(x, a.dtype)

    return jax.tree_util.tree_map_with_path(one, shapes)


def model_params(cfg, seed: int):
    """``numpy_init`` params for a decoder config."""
    import jax

    from tokax.model.decoder import init_params

    return numpy_init(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.PRNGKey(0)), seed)


def tiny_target(seed: int = 21):
    """``(cfg, params)``: the tiny target of the lossless tests (vocabulary of 8)."""
    from tokax.model import config as mc

    cfg = mc.tiny(vocab_size=TINY_VOCAB)
    return cfg, model_params(cfg, seed=seed)


def tiny_draft(seed: int = 5):
    """``(cfg, params)``: a one-layer draft on the tiny target's vocabulary."""
    from tokax.model import config as mc

    cfg = mc.tiny(vocab_size=TINY_VOCAB, n_layers=1, d_model=16, n_heads=2, n_kv_heads=1, ffn_dim=32)
    return cfg, model_params(cfg, seed=seed)


def ragged_prompts() -> tuple[list[list[int]], list[int]]:
    """8 prompts of different lengths over the tiny vocabulary, some with repeats, and their budgets."""
    rs = np.random.RandomState(7)
    base = [rs.randint(0, TINY_VOCAB, size=n).tolist() for n in (1, 2, 5, 9, 16, 12, 3, 7)]
    base[4] = base[3][:8] + base[3][:8]  # a repeated block
    budgets = [16, 9, 13, 16, 5, 16, 11, 14]
    return base, budgets


def tiny_datastore():
    """A retrieval datastore of random "documents" over the tiny vocabulary: every short context
    is stored, so rows whose own context has no match still draft."""
    from tokax.decode.proposers.retrieval import build_table

    rs = np.random.RandomState(11)
    return build_table([rs.randint(0, TINY_VOCAB, size=60) for _ in range(40)], max_n=2, min_count=1)


def sampling_params():
    from tokax.decode.sampling import SamplingParams

    return SamplingParams.make(temperature=0.9, top_k=6, top_p=0.95)


def exact_target_distribution(cfg, params, prompt: list[int], n: int, sp) -> np.ndarray:
    """P(x_1..x_n | prompt) under the processed target distribution, flattened over the
    ``V**n`` continuations, by enumerating all ``V**(n-1)`` prefixes in one cache-free forward."""
    import itertools

    import jax
    import jax.numpy as jnp

    from tokax.decode.sampling import process_logits

    V, L = cfg.vocab_size, len(prompt)
    seqs = np.array([prompt + list(t) for t in itertools.product(range(V), repeat=n - 1)], np.int32)
    logits = batch_logits(cfg, params, jnp.asarray(seqs))
    logp = np.asarray(jax.nn.log_softmax(process_logits(logits[:, L - 1:], sp), -1), np.float64)  # [V**(n-1), n, V]
    probs = np.zeros((V,) * n)
    for row, t in enumerate(itertools.product(range(V), repeat=n - 1)):
        for x in range(V):
            probs[t + (x,)] = np.exp(sum(logp[row, i, t[i]] for i in range(n - 1)) + logp[row, n - 1, x])
    return probs.reshape(-1)


def chi2_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of integer ``samples`` to ``probs``; cells with expected count
    < 5 are pooled. A sample in a zero-probability cell gives p = 0."""
    from scipy import stats

    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs)).astype(np.float64)
    probs = np.asarray(probs, np.float64)
    if counts[probs <= 0].sum() > 0:
        return 0.0
    exp = probs * n
    small = exp < 5
    obs_c = np.append(counts[~small], counts[small].sum())
    exp_c = np.append(exp[~small], exp[small].sum())
    if exp_c[-1] == 0:
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    exp_c *= obs_c.sum() / exp_c.sum()  # float round-off only
    return float(stats.chisquare(obs_c, exp_c).pvalue)


def sampled_codes(gen, seeds, sp, rows: int = 2048, prompt: list[int] = SAMPLE_PROMPT, n: int = N_SAMPLED):
    """``rows`` sampled continuations of ``n`` tokens after ``prompt`` per seed, as indices into
    ``exact_target_distribution``'s cells, and every row's statistics (speculative generators)."""
    V = gen.cfg.vocab_size
    codes, st_all = [], []
    for seed in seeds:
        out = gen.generate([prompt] * rows, n, sp, seed=seed)
        outs, st = out if isinstance(out, tuple) else (out, [])
        arr = np.array(outs)
        if arr.shape != (rows, n):
            raise AssertionError(f"sampled {arr.shape}, want {(rows, n)} (a row stopped early?)")
        codes.append(np.ravel_multi_index(arr.T, (V,) * n))
        st_all += st
    return np.concatenate(codes), st_all


def resample_from_p_verify(p_logits, drafts, n_draft, q_logits, sp, rng):
    """WRONG (a negative control): accept with min(1, p/q) but resample from p instead of
    norm(max(0, p - q)) after a rejection."""
    import jax
    import jax.numpy as jnp

    from tokax.decode.sampling import process_logits
    from tokax.decode.verify import draft_probs, leading_true

    B, K = drafts.shape
    k1, k2 = jax.random.split(rng)
    p = jax.nn.softmax(process_logits(p_logits, sp), -1)
    q = draft_probs(drafts, q_logits, p.shape[-1], sp)
    px = jnp.take_along_axis(p[:, :K], drafts[..., None], -1)[..., 0]
    qx = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    ok = (jax.random.uniform(k1, (B, K)) * qx < px) & (jnp.arange(K)[None] < n_draft[:, None])
    n_acc = leading_true(ok)
    p_n = jnp.take_along_axis(p, n_acc[:, None, None], 1)[:, 0]
    return n_acc, jax.random.categorical(k2, jnp.log(p_n), -1).astype(jnp.int32)


def always_accept_verify(p_logits, drafts, n_draft, q_logits, sp, rng):
    """WRONG (a negative control): accept every draft (the output follows q, not p)."""
    import jax
    import jax.numpy as jnp

    from tokax.decode.sampling import process_logits

    p = jax.nn.softmax(process_logits(p_logits, sp), -1)
    nxt = jax.random.categorical(rng, jnp.log(jnp.take_along_axis(p, n_draft[:, None, None], 1)[:, 0]), -1)
    return n_draft, nxt.astype(jnp.int32)


def lossless_cases(workdir: str) -> dict[str, tuple[str, dict, dict]]:
    """Every registered decoding method, and variants that exercise other heads, as
    ``name -> (method, block overrides, make_generator keywords)`` on ``tiny_target()``:
    small rounds and trees, the tiny draft (or its subset-head form), the tiny datastore, and
    random heads / adapters saved under ``workdir`` (so the blocks name files, as users' do).
    Build one with ``tiny_generator(name, cases)``."""
    import os

    import jax

    from tokax.decode.proposers import kangaroo, save_params, specdec_pp
    from tokax.model.heads import init_heads, subset_head_params

    cfg, params = tiny_target()
    dcfg, dparams = tiny_draft()
    draft, draft_subset = (dcfg, dparams), (dcfg, subset_head_params(dparams, SUBSET))
    store = tiny_datastore()

    def saved(name, tree):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            save_params(path, tree)
        return path

    adapter = numpy_init(jax.eval_shape(lambda k: kangaroo.init_adapter(cfg, 1, k), jax.random.PRNGKey(0)), seed=3)
    head = saved("specdec_head.npz", specdec_pp.init_head(dcfg.d_model, jax.random.PRNGKey(4), scale=4.0))
    subset_adapter = saved("kangaroo_subset.npz", {"adapter": adapter, "head_ids": np.asarray(SUBSET, np.int32),
                                                   "final_norm": params["final_norm"] + 0.5})
    K = 3
    return {
        # chains
        "draft": ("draft", {"k": K}, {"draft": draft}),
        "draft_subset": ("draft", {"k": K}, {"draft": draft_subset}),
        "prompt_lookup": ("prompt_lookup", {"k": K, "max_ngram": 2}, {}),
        "retrieval": ("retrieval", {"k": K, "max_ngram": 2, "min_conf": 0.2}, {"datastore": store}),
        "retrieval_table": ("retrieval", {"k": K, "min_conf": 0.2, "prompt_lookup": False}, {"datastore": store}),
        "anpd": ("anpd", {"k": K, "max_ngram": 3, "init_ngram": 2}, {}),
        "kangaroo": ("kangaroo", {"k": K, "layers": 1, "threshold": 0.4,
                                  "adapter": saved("kangaroo.npz", adapter)}, {}),
        # its own final norm and a head over SUBSET only (as the shipped Gemma adapter): q = 0 elsewhere
        "kangaroo_subset": ("kangaroo", {"k": K, "layers": 1, "threshold": 0.4, "adapter": subset_adapter}, {}),
        "specdec_pp": ("specdec_pp", {"k": K, "threshold": 0.6, "head": head}, {"draft": draft}),
        "specdec_pp_subset": ("specdec_pp", {"k": K, "threshold": 0.6, "head": head}, {"draft": draft_subset}),
        # a small pool (16 buckets x 2 slots) so that buckets collide and slots get overwritten
        "lookahead": ("lookahead", {"k": K, "ngram": 3, "buckets": 16, "slots": 2}, {}),
        "blockwise": ("blockwise", {"k": K, "heads": saved("heads.npz", init_heads(cfg.d_model, K, jax.random.PRNGKey(3),
                                                                                    scale=1.5))}, {}),
        # token trees
        "tree": ("tree", {"branching": (3, 2, 1)}, {"draft": draft}),
        "dyspec": ("dyspec", {"n_nodes": 8, "rounds": 3, "max_children": 3}, {"draft": draft}),
        "token_recycling": ("token_recycling", {"branching": (3, 2, 1), "table_k": 3}, {}),
        "spectr": ("spectr", {"k": 3, "length": 3}, {"draft": draft}),
        # Medusa: the blockwise heads' top-k tree from the target's own hidden state (random heads)
        "medusa": ("medusa", {"topk": (3, 2, 1), "heads": saved("medusa_heads.npz", init_heads(
            cfg.d_model, 3, jax.random.PRNGKey(3), scale=1.0))}, {}),
        # retrieval as a tree: prompt lookup, the datastore and its runner-up
        "retrieval_tree": ("retrieval_tree", {"branches": (3, 2, 1), "max_ngram": 2, "min_conf": 0.2,
                                              "alt_min_conf": 0.05}, {"datastore": store}),
    }


def tiny_generator(name: str, cases: dict, **kw):
    """The generator of ``lossless_cases`` entry ``name``, built by the method registry on the
    tiny target (no stop token, no screen: the tiny target is float32 but tests the float32 path)."""
    from tokax.decode import methods

    method, over, extra = cases[name]
    block = methods.default_block(method)
    for k, v in over.items():
        block[k] = v
    cfg, params = tiny_target()
    return methods.make_generator(method, block, cfg, params, **{"eos_ids": (), **extra, **kw})

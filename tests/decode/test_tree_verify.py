"""Tree verifiers against independent references, without a model: a numpy
loop for greedy, and for sampling the exact target distribution of the first
three emitted tokens (chi-square over many rows), with trees drawn in numpy
from a synthetic draft and deliberately wrong rules as negative controls.

The synthetic target and draft are tables of next-token distributions given
the path so far (depth <= 2). A row emits its accepted path plus one token;
tokens past that are completed by sampling the target table in numpy (what
plain decoding would do next), so the three tokens follow the target's joint
distribution exactly iff the verifier is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.testing import chi2_pvalue
from tokax.decode.sampling import SamplingParams, process_logits
from tokax.decode.tree import SpecTrVerifier, Tree, greedy_tree_verify, sampling_tree_verify, spectr_rho

V = 6
ROWS = 40_000
SP = SamplingParams.make(temperature=0.9, top_k=5, top_p=0.97)


def processed(logits):
    return np.asarray(jax.nn.softmax(process_logits(jnp.asarray(logits, jnp.float32), SP), -1), np.float64)


@pytest.fixture(scope="module")
def tables():
    """Target logits given paths of length 0, 1, 2 and draft logits given length 0, 1."""
    rs = np.random.RandomState(0)
    pl = [1.5 * rs.randn(V), 1.5 * rs.randn(V, V), 1.5 * rs.randn(V, V, V)]
    # A draft close to the target (as a real draft is): high acceptance, and
    # rho = 1 then over-accepts tokens with c * q > p (the negative control).
    ql = [pl[0] + rs.randn(V), pl[1] + rs.randn(V, V)]
    p = [processed(x) for x in pl]
    q = [processed(x) for x in ql]
    return dict(pl=pl, ql=ql, p=p, q=q)


def vdraw(rs, w):
    """One draw per row from the rows of ``w [R, V]`` (normalized here)."""
    w = w / w.sum(1, keepdims=True)
    u = rs.rand(w.shape[0], 1)
    return np.minimum((np.cumsum(w, 1) < u).sum(1), V - 1)


def children(rs, probs, n, replace, deterministic, offset):
    """``n`` children per row from ``probs [R, V]``: their tokens ``[R, n]``
    and the distribution each was drawn from given the earlier ones ``[R, n, V]``."""
    R = probs.shape[0]
    toks = np.zeros((R, n), np.int64)
    qs = np.zeros((R, n, V))
    w = probs.copy()
    for j in range(n):
        if deterministic:
            toks[:, j] = (offset + 1 + 2 * j) % V
        else:
            qs[:, j] = w / w.sum(1, keepdims=True)
            toks[:, j] = vdraw(rs, w)
            if not replace:
                w[np.arange(R), toks[:, j]] = 0.0
    return toks, qs


def build_trees(t, rs, branching=(3, 2), replace=False, deterministic=False):
    """Rows of depth-2 trees: ``branching[0]`` children of the root, each with
    ``branching[1]`` children; children drawn from the draft (without
    replacement unless ``replace``), or fixed tokens when ``deterministic``."""
    b0, b1 = branching
    N = b0 + b0 * b1
    parents = [-1] * b0 + [i for i in range(b0) for _ in range(b1)]
    tokens = np.zeros((ROWS, N), np.int32)
    qp = np.zeros((ROWS, N, V), np.float32)
    p_logits = np.zeros((ROWS, 1 + N, V), np.float32)
    p_logits[:, 0] = t["pl"][0]
    x, qx = children(rs, np.tile(t["q"][0], (ROWS, 1)), b0, replace, deterministic, 0)
    tokens[:, :b0], qp[:, :b0] = x, qx
    p_logits[:, 1 : 1 + b0] = t["pl"][1][x]
    for i in range(b0):
        sl = slice(b0 + i * b1, b0 + (i + 1) * b1)
        y, qy = children(rs, t["q"][1][x[:, i]], b1, replace, deterministic, 3 * i)
        tokens[:, sl], qp[:, sl] = y, qy
        p_logits[:, 1 + sl.start : 1 + sl.stop] = t["pl"][2][x[:, i][:, None], y]
    tree = Tree(
        tokens=jnp.asarray(tokens),
        parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (ROWS, N)),
        valid=jnp.ones((ROWS, N), bool),
        q_probs=None if deterministic else jnp.asarray(qp),
    )
    return tree, jnp.asarray(p_logits)


def emitted_codes(t, tree, n_acc, path, nxt, rs):
    """Codes of the first three tokens: the accepted path, the verifier's
    token, then exact target samples (numpy) for the rest."""
    n_acc, path, nxt = np.asarray(n_acc), np.asarray(path), np.asarray(nxt)
    toks = np.asarray(tree.tokens)
    R = len(n_acc)
    out = np.zeros((R, 3), np.int64)
    path_tok = np.take_along_axis(toks, np.maximum(path, 0), 1)
    for d in range(2):
        out[:, d] = np.where(n_acc > d, path_tok[:, d], 0)
    out[np.arange(R), n_acc] = nxt
    for d in range(1, 3):  # complete with exact target samples
        dist = t["p"][d][tuple(out[:, e] for e in range(d))]  # [R, V]
        out[:, d] = np.where(n_acc < d, vdraw(rs, dist), out[:, d])
    return np.ravel_multi_index(out.T, (V, V, V)), n_acc


def joint(t):
    p = t["p"]
    return (p[0][:, None, None] * p[1][:, :, None] * p[2]).reshape(-1)


def run_tree(tree, p_logits, wrong=False, seed=0):
    f = jax.jit(lambda pl, tr, k: sampling_tree_verify(pl, tr, SP, k, 2, update_residual=not wrong))
    return f(p_logits, tree, jax.random.PRNGKey(seed))


@pytest.mark.parametrize("kind", ["without_replacement", "iid", "deterministic"])
def test_recursive_rejection_is_exact(tables, kind):
    rs = np.random.RandomState(1)
    tree, pl = build_trees(tables, rs, replace=kind == "iid", deterministic=kind == "deterministic")
    n_acc, path, nxt = run_tree(tree, pl)
    codes, n = emitted_codes(tables, tree, n_acc, path, nxt, rs)
    assert (n == 0).any() and (n == 1).any() and (n == 2).any()  # every outcome is exercised
    assert chi2_pvalue(codes, joint(tables)) > 0.01


def test_recursive_rejection_without_residual_fails(tables):
    """Negative control: testing later siblings against the unchanged target."""
    rs = np.random.RandomState(2)
    tree, pl = build_trees(tables, rs)
    n_acc, path, nxt = run_tree(tree, pl, wrong=True)
    codes, _ = emitted_codes(tables, tree, n_acc, path, nxt, rs)
    assert chi2_pvalue(codes, joint(tables)) < 1e-3


def spectr_trees(t, rs, k=3):
    """k i.i.d. draft chains of length 2, depth-major layout."""
    tokens = np.zeros((ROWS, 2 * k), np.int32)
    qp = np.zeros((ROWS, 2 * k, V), np.float32)
    p_logits = np.zeros((ROWS, 1 + 2 * k, V), np.float32)
    p_logits[:, 0] = t["pl"][0]
    for j in range(k):
        a = vdraw(rs, np.tile(t["q"][0], (ROWS, 1)))
        y = vdraw(rs, t["q"][1][a])
        tokens[:, j], tokens[:, k + j] = a, y
        qp[:, j], qp[:, k + j] = t["q"][0], t["q"][1][a]
        p_logits[:, 1 + j] = t["pl"][1][a]
        p_logits[:, 1 + k + j] = t["pl"][2][a, y]
    parents = [-1] * k + list(range(k))
    tree = Tree(tokens=jnp.asarray(tokens), parents=jnp.broadcast_to(jnp.asarray(parents, jnp.int32), (ROWS, 2 * k)),
                valid=jnp.ones((ROWS, 2 * k), bool), q_probs=jnp.asarray(qp))
    return tree, jnp.asarray(p_logits)


@pytest.mark.parametrize("fixed_rho", [None, 1.0])
def test_spectr_k_sequential_is_exact(tables, fixed_rho):
    """SpecTr's rule passes; rho = 1 with k = 3 drafts (over-acceptance) fails."""
    rs = np.random.RandomState(3)
    tree, pl = spectr_trees(tables, rs)
    ver = SpecTrVerifier(3, 2, fixed_rho=fixed_rho)
    n_acc, path, nxt = jax.jit(lambda a, b, c: ver.sample(a, b, SP, c, 2))(pl, tree, jax.random.PRNGKey(4))
    codes, n = emitted_codes(tables, tree, n_acc, path, nxt, rs)
    if fixed_rho is None:
        assert (n == 0).any() and (n == 2).any()
        assert chi2_pvalue(codes, joint(tables)) > 0.01
    else:
        assert chi2_pvalue(codes, joint(tables)) < 1e-3


def test_spectr_rho_solves_the_validity_condition():
    """rho is the smallest value in [1, m] with 1 - (1 - beta)^m <= rho beta
    (checked on a fine grid in numpy); m = 1 gives rho = 1."""
    rs = np.random.RandomState(5)
    B = 16
    p = rs.dirichlet(np.ones(V), size=B)
    q = rs.dirichlet(np.ones(V), size=B)
    m = rs.randint(1, 5, size=B)
    rho = np.asarray(spectr_rho(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32), jnp.asarray(m)))
    for b in range(B):
        grid = np.linspace(1.0, m[b], 20001)
        beta = np.minimum(q[b][None], p[b][None] / grid[:, None]).sum(1)
        ok = 1 - (1 - beta) ** m[b] <= grid * beta + 1e-9
        want = grid[np.argmax(ok)]
        assert abs(rho[b] - want) < 2e-3 * m[b], (b, rho[b], want)
        if m[b] == 1:
            assert abs(rho[b] - 1.0) < 1e-6


def test_greedy_tree_verify_matches_loop():
    rs = np.random.RandomState(6)
    B, N = 256, 10
    # Random topological trees: parent of node i uniform over [-1, i).
    parents = np.stack([[rs.randint(-1, i) for i in range(N)] for _ in range(B)]).astype(np.int32)
    p_logits = rs.randn(B, 1 + N, 3).astype(np.float32)  # 3 tokens: matches are frequent
    tokens = rs.randint(0, 3, size=(B, N)).astype(np.int32)
    valid = rs.rand(B, N) < 0.9
    depth = np.zeros((B, N), int)
    for b in range(B):
        for i in range(N):
            depth[b, i] = 1 if parents[b, i] < 0 else depth[b, parents[b, i]] + 1
            if parents[b, i] >= 0 and not valid[b, parents[b, i]]:
                valid[b, i] = False
    tree = Tree(tokens=jnp.asarray(tokens), parents=jnp.asarray(parents), valid=jnp.asarray(valid))
    Dm = int(depth.max())
    n_acc, path, nxt = jax.jit(lambda a, t: greedy_tree_verify(a, t, Dm))(jnp.asarray(p_logits), tree)
    top = p_logits.argmax(-1)
    for b in range(B):
        cur, want = 0, []
        while True:
            kids = [i for i in range(N) if valid[b, i] and parents[b, i] + 1 == cur and tokens[b, i] == top[b, cur]]
            if not kids:
                break
            want.append(kids[0])
            cur = kids[0] + 1
        assert int(n_acc[b]) == len(want) and list(np.asarray(path[b, : len(want)])) == want
        assert int(nxt[b]) == top[b, cur]
    assert np.asarray(n_acc).max() >= 2 and (np.asarray(n_acc) == 0).any()

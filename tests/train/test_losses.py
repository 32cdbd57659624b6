"""Every loss against an independent numpy implementation of its formula: values, metrics and gradients.

The numpy references below are written from the papers / TRL's formulas in
float64; gradients come from central finite differences of those references.
The JAX losses run in float32 and in float64 (jax.enable_x64).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.train.losses import (
    LOSS_INFO,
    LOSSES,
    PreferenceBatch,
    RunningMean,
    TokenBatch,
    UnpairedBatch,
    assert_finite,
    check_finite,
    get_loss,
    kto_kl_estimate,
    update_running_mean,
    validate_batch,
    validate_preference_batch,
    validate_token_batch,
    validate_unpaired_batch,
)

B, T = 6, 7
TOL = {"float32": 1e-5, "float64": 1e-8}


# ----------------------------------------------------------------------------
# numpy helpers
# ----------------------------------------------------------------------------


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def fd_grad(f, x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of scalar f at x (float64)."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += eps
        xm[i] -= eps
        g[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


@contextlib.contextmanager
def precision(dtype: str):
    if dtype == "float64":
        with jax.enable_x64(True):
            yield jnp.float64
    else:
        yield jnp.float32


def close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------
# fixed random inputs
# ----------------------------------------------------------------------------


def paired_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    nw = rng.integers(3, 13, B).astype(np.float64)
    nl = rng.integers(3, 13, B).astype(np.float64)
    # mean token log-probs in (-3, -0.3): sums are negative, ORPO's log-odds are defined
    pw = -nw * rng.uniform(0.3, 3.0, B)
    pl = -nl * rng.uniform(0.3, 3.0, B)
    # log-ratio margins Delta of both signs and on both sides of the hinge's margin (1/beta = 2)
    delta = rng.permutation(np.array([-3.1, -1.2, 0.4, 1.5, 2.6, 4.3])) + rng.normal(0, 0.1, B)
    rw = pw + rng.normal(0, 1.0, B)
    rl = pl - (pw - rw) + delta  # (pw - rw) - (pl - rl) = delta
    kw = rng.uniform(0.0, 3.0, B)
    kl = rng.uniform(0.0, 3.0, B)
    return dict(pw=pw, pl=pl, nw=nw, nl=nl, rw=rw, rl=rl, kw=kw, kl=kl)


def make_pref(x: dict, dt) -> PreferenceBatch:
    a = lambda k: jnp.asarray(x[k], dt)  # noqa: E731
    return PreferenceBatch(
        chosen_logps=a("pw"),
        rejected_logps=a("pl"),
        chosen_counts=a("nw"),
        rejected_counts=a("nl"),
        ref_chosen_logps=a("rw"),
        ref_rejected_logps=a("rl"),
        chosen_kl=a("kw"),
        rejected_kl=a("kl"),
    )


# ----------------------------------------------------------------------------
# numpy references: (loss, chosen_rewards, rejected_rewards)
# ----------------------------------------------------------------------------


def np_dpo(x, beta, label_smoothing=0.0):
    d = (x["pw"] - x["rw"]) - (x["pl"] - x["rl"])
    e = label_smoothing
    loss = np.mean(-(1 - e) * logsig(beta * d) - e * logsig(-beta * d))
    return loss, beta * (x["pw"] - x["rw"]), beta * (x["pl"] - x["rl"])


def np_robust(x, beta, label_smoothing):
    # unbiased estimator of Chowdhury et al.: ((1-e) l(h) - e l(-h)) / (1 - 2e), l = -log sigmoid
    d = (x["pw"] - x["rw"]) - (x["pl"] - x["rl"])
    e = label_smoothing
    ell = lambda h: -logsig(h)  # noqa: E731
    loss = np.mean(((1 - e) * ell(beta * d) - e * ell(-beta * d)) / (1 - 2 * e))
    return loss, beta * (x["pw"] - x["rw"]), beta * (x["pl"] - x["rl"])


def np_ipo(x, beta):
    cw = x["pw"] / x["nw"] - x["rw"] / x["nw"]
    cl = x["pl"] / x["nl"] - x["rl"] / x["nl"]
    return np.mean((cw - cl - 1 / (2 * beta)) ** 2), beta * cw, beta * cl


def np_hinge(x, beta):
    d = (x["pw"] - x["rw"]) - (x["pl"] - x["rl"])
    return np.mean(np.maximum(0.0, 1 - beta * d)), beta * (x["pw"] - x["rw"]), beta * (x["pl"] - x["rl"])


def np_simpo(x, beta, gamma, label_smoothing=0.0, sft_weight=0.0):
    u = beta / x["nw"] * x["pw"] - beta / x["nl"] * x["pl"] - gamma
    e = label_smoothing
    loss = np.mean(-(1 - e) * logsig(u) - e * logsig(-u))
    loss += sft_weight * (-x["pw"].sum() / x["nw"].sum())
    return loss, beta * x["pw"] / x["nw"], beta * x["pl"] / x["nl"]


def np_orpo(x, lam):
    pw, pl = np.exp(x["pw"] / x["nw"]), np.exp(x["pl"] / x["nl"])  # P(y|x) as geometric mean
    log_odds_ratio = np.log((pw / (1 - pw)) / (pl / (1 - pl)))
    nll = -x["pw"].sum() / x["nw"].sum()  # token-mean cross-entropy of the chosen
    return nll - lam * np.mean(logsig(log_odds_ratio)), lam * x["pw"] / x["nw"], lam * x["pl"] / x["nl"]


def np_tdpo(x, beta, alpha=1.0):
    u = (x["pw"] - x["rw"]) - (x["pl"] - x["rl"])
    delta = x["kl"] - x["kw"]
    return np.mean(-logsig(beta * (u - alpha * delta))), beta * (x["pw"] - x["rw"]), beta * (x["pl"] - x["rl"])


# name, hyperparameters, numpy reference, fields that get a gradient, fields whose gradient must be 0
PAIRED_CASES = [
    ("dpo", dict(beta=0.3), lambda x: np_dpo(x, 0.3), ("pw", "pl"), ()),
    ("dpo", dict(beta=0.3, label_smoothing=0.2), lambda x: np_dpo(x, 0.3, 0.2), ("pw", "pl"), ()),
    ("cdpo", dict(beta=0.2, label_smoothing=0.15), lambda x: np_dpo(x, 0.2, 0.15), ("pw", "pl"), ()),
    ("robust_dpo", dict(beta=0.3, label_smoothing=0.2), lambda x: np_robust(x, 0.3, 0.2), ("pw", "pl"), ()),
    ("ipo", dict(beta=0.4), lambda x: np_ipo(x, 0.4), ("pw", "pl"), ()),
    ("hinge", dict(beta=0.5), lambda x: np_hinge(x, 0.5), ("pw", "pl"), ()),
    ("simpo", dict(beta=2.0, gamma=0.7), lambda x: np_simpo(x, 2.0, 0.7), ("pw", "pl"), ()),
    (
        "simpo",
        dict(beta=2.5, gamma=1.0, label_smoothing=0.1, sft_weight=0.5),
        lambda x: np_simpo(x, 2.5, 1.0, 0.1, 0.5),
        ("pw", "pl"),
        (),
    ),
    ("orpo", dict(lam=0.3), lambda x: np_orpo(x, 0.3), ("pw", "pl"), ()),
    ("tdpo1", dict(beta=0.3), lambda x: np_tdpo(x, 0.3), ("pw", "pl", "kw", "kl"), ()),
    # TDPO2 stops the gradient through the chosen KL: its reference gradient is 0
    ("tdpo2", dict(beta=0.3, alpha=0.5), lambda x: np_tdpo(x, 0.3, 0.5), ("pw", "pl", "kl"), ("kw",)),
]
FIELD = {"pw": "chosen_logps", "pl": "rejected_logps", "kw": "chosen_kl", "kl": "rejected_kl"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", PAIRED_CASES, ids=lambda c: f"{c[0]}-{'-'.join(f'{k}{v}' for k, v in c[1].items())}")
def test_paired_loss_matches_numpy(case, dtype):
    name, hp, ref, grad_fields, zero_fields = case
    x = paired_inputs(1)
    tol = TOL[dtype]
    want, want_cr, want_rr = ref(x)
    diff_fields = grad_fields + zero_fields
    with precision(dtype) as dt:
        fn = get_loss(name)

        def f(*vals):
            y = dict(x)
            y.update({k: v for k, v in zip(diff_fields, vals)})
            return fn(make_pref(y, dt), **hp)

        vals = tuple(jnp.asarray(x[k], dt) for k in diff_fields)
        (loss, metrics), grads = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(vals))), has_aux=True))(*vals)
    close(loss, want, tol)
    for k, g in zip(diff_fields, grads):
        if k in zero_fields:
            assert np.all(np.asarray(g) == 0), f"{name}: gradient w.r.t. {FIELD[k]} must be stopped"
            continue

        def scalar(v, k=k):
            y = dict(x)
            y[k] = v
            return ref(y)[0]

        close(g, fd_grad(scalar, x[k]), tol)
    # TRL-style metrics
    close(metrics["rewards/chosen"], want_cr.mean(), tol)
    close(metrics["rewards/rejected"], want_rr.mean(), tol)
    close(metrics["rewards/margins"], (want_cr - want_rr).mean(), tol)
    close(metrics["rewards/accuracies"], (want_cr > want_rr).mean(), tol)
    close(metrics["logps/chosen"], x["pw"].mean(), tol)
    close(metrics["logps/rejected"], x["pl"].mean(), tol)


def test_tdpo_kl_metrics_and_hinge_has_both_regimes():
    x = paired_inputs(1)
    _, m = get_loss("tdpo1")(make_pref(x, jnp.float32), beta=0.3)
    close(m["kl/chosen"], x["kw"].mean(), 1e-6)
    close(m["kl/rejected"], x["kl"].mean(), 1e-6)
    # the hinge test above only means something if some pairs are inside the margin and some outside
    d = (x["pw"] - x["rw"]) - (x["pl"] - x["rl"])
    assert np.any(1 - 0.5 * d > 0) and np.any(1 - 0.5 * d < 0)


# ----------------------------------------------------------------------------
# unpaired: KTO, BCO
# ----------------------------------------------------------------------------


def unpaired_inputs(seed: int = 2):
    rng = np.random.default_rng(seed)
    n = rng.integers(3, 13, B).astype(np.float64)
    lp = -n * rng.uniform(0.3, 3.0, B)
    ref = lp + rng.normal(0, 3.0, B)
    d = np.array([True, False, True, True, False, False])
    return lp, ref, n, d


def make_unpaired(lp, ref, n, d, dt):
    return UnpairedBatch(jnp.asarray(lp, dt), jnp.asarray(ref, dt), jnp.asarray(n, dt), jnp.asarray(d))


def np_kto(lp, ref, d, z, beta, wd, wu):
    r = lp - ref
    return np.mean(np.where(d, wd * (1 - sigmoid(beta * (r - z))), wu * (1 - sigmoid(beta * (z - r)))))


def np_bco(lp, ref, d, delta, beta):
    r = beta * (lp - ref)
    return np.mean(np.where(d, -logsig(r - delta), -logsig(-(r - delta))))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", ["kto", "bco"])
def test_unpaired_loss_matches_numpy(name, dtype):
    lp, ref, n, d = unpaired_inputs()
    tol = TOL[dtype]
    beta = 0.2
    if name == "kto":
        z = 0.7
        hp = dict(kl_estimate=z, beta=beta, desirable_weight=1.0, undesirable_weight=1.33)
        np_loss = lambda v: np_kto(v, ref, d, z, beta, 1.0, 1.33)  # noqa: E731
        baseline = beta * z
    else:
        delta = 0.25
        hp = dict(delta=delta, beta=beta)
        np_loss = lambda v: np_bco(v, ref, d, delta, beta)  # noqa: E731
        baseline = delta
    with precision(dtype) as dt:
        fn = get_loss(name)
        f = lambda v: fn(make_unpaired(v, ref, n, d, dt), **hp)  # noqa: E731
        (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(lp, dt))
    close(loss, np_loss(lp), tol)
    close(g, fd_grad(np_loss, lp), tol)
    r = beta * (lp - ref)
    close(m["rewards/chosen"], r[d].mean(), tol)
    close(m["rewards/rejected"], r[~d].mean(), tol)
    close(m["rewards/margins"], r[d].mean() - r[~d].mean(), tol)
    close(m["rewards/accuracies"], np.mean(np.where(d, r > baseline, r < baseline)), tol)
    close(m["logps/chosen"], lp[d].mean(), tol)
    close(m["logps/rejected"], lp[~d].mean(), tol)


def test_kto_reference_point_is_detached_and_clamped():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=B), rng.normal(size=B)
    close(kto_kl_estimate(jnp.asarray(a), jnp.asarray(b)), max(0.0, np.mean(a - b)), 1e-6)
    close(kto_kl_estimate(jnp.asarray(a - 5), jnp.asarray(b)), 0.0, 0)  # negative estimate -> 0
    g = jax.grad(lambda a: kto_kl_estimate(a, jnp.asarray(b - 5)))(jnp.asarray(a))
    assert np.all(np.asarray(g) == 0)
    lp, ref, n, d = unpaired_inputs()
    gz = jax.grad(lambda z: get_loss("kto")(make_unpaired(lp, ref, n, d, jnp.float32), kl_estimate=z)[0])(0.5)
    assert float(gz) == 0.0


def test_bco_running_mean_is_mean_of_all_rewards_seen():
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=k) for k in (4, 6, 3)]
    state = RunningMean.init()
    for i, v in enumerate(batches):
        state = update_running_mean(state, jnp.asarray(v, jnp.float32))
        seen = np.concatenate(batches[: i + 1])
        close(state.mean, seen.mean(), 1e-6)
        close(state.count, seen.size, 0)


# ----------------------------------------------------------------------------
# token-level: SFT, distillation, T-REG
# ----------------------------------------------------------------------------


def token_inputs(seed: int = 5):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7
    mask[:, 0] = True
    lp = -rng.uniform(0.01, 4.0, (B, T))
    lse = rng.normal(3.0, 2.0, (B, T))
    kl = rng.uniform(0.0, 2.0, (B, T))
    return mask, lp, lse, kl


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sft_matches_numpy(dtype):
    mask, lp, lse, _ = token_inputs()
    zc = 1e-2

    def np_sft(lp, lse):
        return -(lp * mask).sum() / mask.sum() + zc * (lse**2 * mask).sum() / mask.sum()

    # masked-out positions hold garbage: they must not matter
    lp_g, lse_g = np.where(mask, lp, 1e6), np.where(mask, lse, -1e6)
    with precision(dtype) as dt:
        f = lambda a, b: get_loss("sft")(TokenBatch(jnp.asarray(mask), a, b), z_loss=zc)  # noqa: E731
        (loss, m), (g_lp, g_lse) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
            jnp.asarray(lp_g, dt), jnp.asarray(lse_g, dt)
        )
    tol = TOL[dtype]
    close(loss, np_sft(lp, lse), tol)
    close(g_lp, fd_grad(lambda v: np_sft(v, lse), lp) * mask, tol)
    close(g_lse, fd_grad(lambda v: np_sft(lp, v), lse) * mask, tol)
    close(m["nll"], -(lp * mask).sum() / mask.sum(), tol)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_distill_matches_numpy(dtype):
    mask, lp, _, kl = token_inputs(6)
    w = 0.3

    def np_distill(kl, lp):
        return (kl * mask).sum() / mask.sum() + w * (-(lp * mask).sum() / mask.sum())

    with precision(dtype) as dt:
        f = lambda k, a: get_loss("distill")(TokenBatch(jnp.asarray(mask), a, None, k), sft_weight=w)  # noqa: E731
        vg = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)
        (loss, m), (g_kl, g_lp) = vg(jnp.asarray(kl, dt), jnp.asarray(lp, dt))
    tol = TOL[dtype]
    close(loss, np_distill(kl, lp), tol)
    close(g_kl, fd_grad(lambda v: np_distill(v, lp), kl), tol)
    close(g_lp, fd_grad(lambda v: np_distill(kl, v), lp), tol)
    close(m["kl"], (kl * mask).sum() / mask.sum(), tol)


def treg_inputs(seed: int = 7):
    rng = np.random.default_rng(seed)
    mw = rng.random((B, T)) < 0.75
    ml = rng.random((B, T)) < 0.75
    mw[:, 0] = ml[:, 0] = True
    lrw = rng.normal(0, 1.0, (B, T))
    lrl = rng.normal(0, 1.0, (B, T))
    rw = rng.uniform(-0.5, 0.5, (B, T))
    rl = rng.uniform(-0.5, 0.5, (B, T))
    return mw, ml, lrw, lrl, rw, rl


def np_treg(lrw, lrl, mw, ml, rw, rl, beta, alpha, w=None):
    rho_w, rho_l = beta * lrw * mw, beta * lrl * ml
    h = rho_w.sum(1) - rho_l.sum(1)
    # Zhou et al. 2024: L_DPO + alpha * sg(sigmoid(-h)) * (-sum rhat*rho over y_w - same over y_l)
    s_w, s_l = (rw * rho_w).sum(1), (rl * rho_l).sum(1)
    if w is None:  # the pair weight sigmoid(-h) is a constant of the gradient: fd passes it fixed
        w = 1.0 / (1.0 + np.exp(h))
    return np.mean(-logsig(h) + alpha * w * (-(s_w + s_l))), rho_w.sum(1), rho_l.sum(1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_treg_matches_numpy(dtype):
    mw, ml, lrw, lrl, rw, rl = treg_inputs()
    beta, alpha = 0.5, 0.7
    pw, pl = lrw.sum(1) - 20.0, lrl.sum(1) - 25.0  # policy sums, only for the logps metrics
    want, cr, rr = np_treg(lrw, lrl, mw, ml, rw, rl, beta, alpha)
    with precision(dtype) as dt:
        a = lambda v: jnp.asarray(v, dt)  # noqa: E731

        def f(lw, ll, tw, tl):
            batch = PreferenceBatch(
                chosen_logps=a(pw),
                rejected_logps=a(pl),
                chosen_counts=a(mw.sum(1)),
                rejected_counts=a(ml.sum(1)),
                chosen_token_logratios=lw,
                rejected_token_logratios=ll,
                chosen_token_rewards=tw,
                rejected_token_rewards=tl,
                chosen_mask=jnp.asarray(mw),
                rejected_mask=jnp.asarray(ml),
            )
            return get_loss("treg")(batch, beta=beta, alpha=alpha)

        # garbage off the masks must not matter
        args = (a(np.where(mw, lrw, 9.0)), a(np.where(ml, lrl, -9.0)), a(rw), a(rl))
        (loss, m), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    tol = TOL[dtype]
    close(loss, want, tol)
    h0 = beta * ((lrw * mw).sum(1) - (lrl * ml).sum(1))
    w0 = 1.0 / (1.0 + np.exp(h0))
    close(grads[0], fd_grad(lambda v: np_treg(v, lrl, mw, ml, rw, rl, beta, alpha, w0)[0], lrw), tol)
    close(grads[1], fd_grad(lambda v: np_treg(lrw, v, mw, ml, rw, rl, beta, alpha, w0)[0], lrl), tol)
    assert np.all(np.asarray(grads[2]) == 0) and np.all(np.asarray(grads[3]) == 0)  # rewards are targets
    close(m["rewards/chosen"], cr.mean(), tol)
    close(m["rewards/accuracies"], (cr > rr).mean(), tol)


# ----------------------------------------------------------------------------
# registry, validation, finiteness
# ----------------------------------------------------------------------------


def _example_batches():
    x = paired_inputs(0)
    mask, lp, lse, kl = token_inputs()
    mw, ml, lrw, lrl, rw, rl = treg_inputs()
    f = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    pref = PreferenceBatch(
        f(x["pw"]), f(x["pl"]), f(x["nw"]), f(x["nl"]), f(x["rw"]), f(x["rl"]), f(x["kw"]), f(x["kl"]),
        f(lrw), f(lrl), f(rw), f(rl), jnp.asarray(mw), jnp.asarray(ml),
    )  # fmt: skip
    lpu, refu, nu, du = unpaired_inputs()
    return {
        "paired": pref,
        "unpaired": make_unpaired(lpu, refu, nu, du, jnp.float32),
        "token": TokenBatch(jnp.asarray(mask), f(lp), f(lse), f(kl)),
    }


def test_registry_covers_every_loss_with_one_interface():
    assert set(LOSSES) == set(LOSS_INFO)
    assert {"sft", "distill", "dpo", "cdpo", "robust_dpo", "ipo", "hinge", "simpo", "orpo", "kto", "bco",
            "tdpo1", "tdpo2", "treg"} <= set(LOSSES)  # fmt: skip
    batches = _example_batches()
    extra = {"kl_estimate": 0.3, "delta": 0.1}
    for name, info in LOSS_INFO.items():
        batch = batches[info.kind]
        validate_batch(batch, name)
        kw = {k: extra[k] for k in info.extra_inputs}
        loss, metrics = jax.jit(lambda b, fn=get_loss(name), kw=kw: fn(b, **kw))(batch)
        assert loss.shape == () and bool(check_finite(loss, metrics)), name
        if info.kind != "token":
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                        "logps/chosen", "logps/rejected"):  # fmt: skip
                assert key in metrics, (name, key)
    with pytest.raises(ValueError, match="unknown loss 'dpoo'.*'dpo'"):
        get_loss("dpoo")


def test_loss_info_declarations_agree_with_fields_and_inputs():
    """What a loss declares it needs from the train step matches the batch fields and per-step
    inputs it reads, so the step (which tests only the declarations) builds what the loss reads."""
    for name, info in LOSS_INFO.items():
        assert info.needs_teacher == ("token_kl" in info.required), name
        assert info.needs_kl_pairs == ("kl_estimate" in info.extra_inputs), name
        assert info.needs_running_mean == ("delta" in info.extra_inputs), name
        assert info.needs_contrastive_rewards == ("chosen_token_rewards" in info.required), name
        assert info.needs_kl_grad == ("chosen_kl" in info.required), name
        assert not info.head_subset or info.needs_teacher, name  # the subset is the teacher's too
        if info.needs_kl_pairs or info.needs_running_mean or info.needs_contrastive_rewards or info.needs_kl_grad:
            assert info.needs_reference, name


def test_empty_completion_raises_naming_the_field():
    pref = _example_batches()["paired"]
    bad = PreferenceBatch(**{**pref.__dict__, "chosen_counts": pref.chosen_counts.at[2].set(0.0)})
    with pytest.raises(ValueError, match=r"chosen_counts.*\[2\].*empty completion"):
        validate_preference_batch(bad)
    bad = PreferenceBatch(**{**pref.__dict__, "rejected_mask": pref.rejected_mask.at[4].set(False)})
    with pytest.raises(ValueError, match=r"rejected_mask.*\[4\].*empty completion"):
        validate_preference_batch(bad, "treg")
    unp = _example_batches()["unpaired"]
    with pytest.raises(ValueError, match=r"UnpairedBatch.counts.*\[0\]"):
        validate_unpaired_batch(UnpairedBatch(unp.logps, unp.ref_logps, unp.counts.at[0].set(0), unp.desirable))
    tok = _example_batches()["token"]
    with pytest.raises(ValueError, match=r"TokenBatch.mask.*\[1\]"):
        validate_token_batch(TokenBatch(tok.mask.at[1].set(False), tok.token_logps))


def test_validation_names_missing_misshapen_and_non_finite_fields():
    pref = _example_batches()["paired"]
    no_ref = PreferenceBatch(pref.chosen_logps, pref.rejected_logps, pref.chosen_counts, pref.rejected_counts)
    validate_preference_batch(no_ref, "simpo")  # reference-free: fine
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        validate_preference_batch(no_ref, "dpo")
    with pytest.raises(ValueError, match="ref_chosen_logps"):  # also at trace time, from the loss itself
        get_loss("dpo")(no_ref)
    with pytest.raises(ValueError, match="chosen_kl"):
        get_loss("tdpo2")(PreferenceBatch(**{**pref.__dict__, "chosen_kl": None}))
    with pytest.raises(ValueError, match="rejected_logps.*batch size"):
        validate_preference_batch(PreferenceBatch(**{**pref.__dict__, "rejected_logps": pref.rejected_logps[:3]}))
    nan_logps = pref.chosen_logps.at[1].set(jnp.nan)
    with pytest.raises(ValueError, match=r"chosen_logps has non-finite values at \[\[1\]\]"):
        validate_preference_batch(PreferenceBatch(**{**pref.__dict__, "chosen_logps": nan_logps}))
    with pytest.raises(ValueError, match="label_smoothing"):
        get_loss("robust_dpo")(pref, label_smoothing=0.5)
    with pytest.raises(TypeError, match="outside jax.jit"):
        jax.jit(validate_preference_batch)(pref)


def test_check_finite_inside_jit_and_assert_finite():
    pref = _example_batches()["paired"]

    @jax.jit
    def step(b):
        loss, metrics = get_loss("dpo")(b, beta=0.1)
        return loss, metrics, check_finite(loss, metrics)

    loss, metrics, ok = step(pref)
    assert bool(ok)
    assert_finite(loss, metrics)  # no error
    for bad_value in (jnp.nan, -jnp.inf):
        bad = PreferenceBatch(**{**pref.__dict__, "chosen_logps": pref.chosen_logps.at[0].set(bad_value)})
        loss, metrics, ok = step(bad)
        assert not bool(ok)
        with pytest.raises(FloatingPointError, match="non-finite loss at step 7"):
            assert_finite(loss, metrics, step=7)

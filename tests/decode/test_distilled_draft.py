"""The distilled draft's export format: LoRA factors + head ids saved as an orbax checkpoint load
back into the merged draft the trainer's LoRA defines (checked against lora_merge done here), with
the head restricted to the saved ids; clear errors for a wrong target or a missing directory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokax.decode.proposers.distilled import load_distilled_draft, make_draft, save_distilled_draft
from tokax.decode.proposers.draft_model import draft_forward
from tokax.model import config as mc
from tokax.model import lora as lora_lib
from tokax.model.decoder import forward, init_params


def test_export_roundtrip(tmp_path):
    cfg = mc.tiny(vocab_size=64, n_layers=3)
    params = init_params(cfg, jax.random.PRNGKey(0))
    layers = [0, 2]
    base = {"embed": params["embed"], "final_norm": params["final_norm"],
            **{f"layer_{i}": params[f"layer_{j}"] for i, j in enumerate(layers)}}
    lora = lora_lib.lora_init(base, ("q", "v", "down"), 4, 8.0, jax.random.PRNGKey(1))
    rs = np.random.RandomState(0)
    lora = jax.tree.map(lambda x: jnp.asarray(rs.randn(*x.shape) * 0.1, jnp.float32), lora)  # B != 0
    ids = np.sort(rs.choice(64, 20, replace=False))
    save_distilled_draft(tmp_path / "d", lora, ids, {"teacher": cfg.name, "layers": layers, "lora_alpha": 8.0})
    dcfg, dp = load_distilled_draft(cfg, params, tmp_path / "d")
    assert dcfg.n_layers == 2 and list(np.asarray(dp["head_ids"])) == list(ids)

    # Reference: the bf16-stored factors merged by lora_merge, full-vocabulary logits restricted to ids.
    stored = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), lora)
    ref_params = lora_lib.lora_merge(base, stored, 8.0)
    tokens = jnp.asarray(rs.randint(0, 64, (2, 7)))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    ref_logits = np.asarray(forward(dcfg, ref_params, tokens, pos)[0])
    got = np.asarray(draft_forward(dcfg, dp, tokens, pos)[0])
    np.testing.assert_allclose(got[..., ids], ref_logits[..., ids], rtol=1e-5, atol=1e-5)
    outside = np.setdiff1d(np.arange(64), ids)
    assert (got[..., outside] < -1e29).all()
    # The factors really changed the draft (the test would not see a dropped LoRA otherwise).
    assert np.abs(np.asarray(forward(dcfg, base, tokens, pos)[0]) - ref_logits).max() > 1e-3


def test_wrong_target_and_missing_dir(tmp_path):
    cfg = mc.tiny(vocab_size=64, n_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    base = {"embed": params["embed"], "final_norm": params["final_norm"], "layer_0": params["layer_0"]}
    lora = lora_lib.lora_init(base, ("q",), 2, 4.0, jax.random.PRNGKey(1))
    save_distilled_draft(tmp_path / "d", lora, np.arange(8), {"teacher": "other-model", "layers": [0], "lora_alpha": 4.0})
    with pytest.raises(ValueError, match="distilled from 'other-model'"):
        load_distilled_draft(cfg, params, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="no distilled draft"):
        make_draft(cfg, params, f"distilled:{tmp_path / 'none'}")
    with pytest.raises(ValueError, match="use 'distilled'"):
        make_draft(cfg, params, "bogus")

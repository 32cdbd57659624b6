"""Device mesh, logical axis names and the rules that map them onto the mesh.

Every parameter and activation dimension has a *logical* name ('vocab',
'embed', 'heads', 'mlp', 'batch', 'length', ...). A config holds *rules*,
an ordered list of ``(logical_name, mesh_axes)`` pairs, that say which mesh
axes (``data``, ``fsdp``, ``tensor``, ``sequence``) a logical dimension is
split over. Changing the layout (pure data parallel, FSDP, tensor parallel,
sequence parallel, or mixes) is then a config change; the model and the
train step never name a mesh axis (the maxtext / t5x scheme).

Resolution of one array's logical axes ``(l_0, ..., l_{n-1})`` into a
``PartitionSpec``: each ``l_i`` maps to the mesh axes its rule names, minus
mesh axes of size 1, minus mesh axes an earlier dimension already took (a
mesh axis may split only one dimension), and minus all of them when the
product of their sizes does not divide the dimension (e.g. Gemma 3 270M's
single KV head under ``tensor=2``): such a dimension is replicated instead of
failing, because a valid but slower layout beats a crash for a research
config.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "make_mesh",
    "param_logical_axes",
    "logical_to_spec",
    "logical_shardings",
    "param_shardings",
    "opt_state_shardings",
    "batch_shardings",
    "replicated",
    "constrain",
    "mesh_context",
]

MESH_AXES = ("data", "fsdp", "tensor", "sequence")

Rules = Sequence[tuple[str, Any]]

# Params: weights split over `fsdp` on their model dimension and over
# `tensor` on heads / FFN / vocabulary (Megatron-style column/row split).
# Activations (`act_*`) have their own names so that the batch can take
# `fsdp` while the weights take it too.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("act_embed", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)

# Logical axes of one decoder layer's weights (the names the decoder gives them).
# `in` axes are contracted with the layer input, `out` axes produce the output;
# LoRA's A takes the `in` axes + rank, B takes rank + the `out` axes.
_LAYER_AXES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "q": (("embed",), ("heads", "head_dim")),
    "k": (("embed",), ("kv_heads", "head_dim")),
    "v": (("embed",), ("kv_heads", "head_dim")),
    "o": (("heads", "head_dim"), ("embed",)),
    "gate": (("embed",), ("mlp",)),
    "up": (("embed",), ("mlp",)),
    "down": (("mlp",), ("embed",)),
}
_NORMS = {"attn_norm": ("norm",), "post_attn_norm": ("norm",), "ffn_norm": ("norm",),
          "post_ffn_norm": ("norm",), "q_norm": ("head_dim",), "k_norm": ("head_dim",)}
_LAYER_RE = re.compile(r"layer_\d+$")


def projection_axes(name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(in_axes, out_axes)`` of a decoder projection ('q', 'k', 'v', 'o', 'gate', 'up', 'down')."""
    try:
        return _LAYER_AXES[name]
    except KeyError:
        raise ValueError(f"unknown projection {name!r}; choose from {sorted(_LAYER_AXES)}") from None


def make_mesh(axes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes ``(data, fsdp, tensor, sequence)`` sized from ``axes``.

    ``axes`` maps each of those names to a size; missing ones are 1 and at
    most one may be -1 (all remaining devices). The product must equal the
    number of devices used (all of ``jax.devices()`` unless ``devices``).
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axis sizes must be positive (or one -1), got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    n = math.prod(sizes)
    if n > len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {n} devices, only {len(devices)} present "
            f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax)"
        )
    # A mesh smaller than the device count uses the first n devices.
    return Mesh(np.asarray(devices[:n]).reshape(sizes), MESH_AXES)


def param_logical_axes(params: Mapping[str, Any]) -> dict[str, Any]:
    """A tree of logical-axis tuples with the structure of the decoder's params.

    Knows the decoder's names (``embed``, ``final_norm``, ``layer_i/{q, k, v, o,
    gate, up, down, *_norm}``) and LoRA trees from ``tokax.model.lora``
    (``layer_i/<proj>/{a, b}``). Raises on an unknown name so that a new
    parameter cannot silently end up replicated.
    """
    out: dict[str, Any] = {}
    for key, val in params.items():
        if key == "embed":
            out[key] = ("vocab", "embed")
        elif key == "final_norm":
            out[key] = ("norm",)
        elif _LAYER_RE.match(key):
            layer: dict[str, Any] = {}
            for name, w in val.items():
                if name in _NORMS:
                    layer[name] = _NORMS[name]
                elif name in _LAYER_AXES:
                    ins, outs = _LAYER_AXES[name]
                    if isinstance(w, Mapping):  # a LoRA adapter pair
                        layer[name] = {"a": ins + ("lora_rank",), "b": ("lora_rank",) + outs}
                    else:
                        layer[name] = ins + outs
                else:
                    raise ValueError(f"param_logical_axes: no logical axes for param {key}/{name}")
            out[key] = layer
        else:
            raise ValueError(f"param_logical_axes: no logical axes for param {key!r}")
    return out


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for item in rules:
        name, axes = item
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name!r} -> {axes}: unknown mesh axes {bad}; use {MESH_AXES}")
        table.setdefault(name, tuple(axes))  # first rule wins
    return table


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """``PartitionSpec`` for one array (see the module docstring for the resolution rules)."""
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    table = _rule_table(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical, shape):
        axes = table.get(name, ()) if name is not None else ()
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        if axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def logical_shardings(logical_tree: Any, shapes_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` tree for arrays (or ShapeDtypeStructs) with the given logical axes."""
    return jax.tree.map(
        lambda ax, x: NamedSharding(mesh, logical_to_spec(ax, np.shape(x), mesh, rules)),
        logical_tree,
        shapes_tree,
        is_leaf=_is_axes,
    )


def param_shardings(params: Any, mesh: Mesh, rules: Rules) -> Any:
    """``NamedSharding`` per param leaf (params may be arrays or ShapeDtypeStructs)."""
    return logical_shardings(param_logical_axes(params), params, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def opt_state_shardings(opt_state_shapes: Any, params: Any, param_sh: Any, mesh: Mesh) -> Any:
    """Shardings for an optax state: a leaf whose key path ends with a param's
    key path and has that param's shape (Adam's mu / nu, momentum, ...) is
    sharded like the param; everything else (step counts, factored Adafactor
    statistics) is replicated."""
    by_path: dict[tuple, tuple[tuple[int, ...], NamedSharding]] = {}
    for (path, p), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_sh)):
        by_path[tuple(_key(k) for k in path)] = (tuple(np.shape(p)), sh)
    rep = replicated(mesh)

    def pick(path, leaf):
        keys = tuple(_key(k) for k in path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return rep

    return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)


def _key(k: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules: Rules) -> dict[str, NamedSharding]:
    """Shardings for a host batch dict of ``[A, B, ...]`` arrays (A = micro-batches
    of gradient accumulation): B over the ``batch`` rule, a second dim (tokens)
    over ``length``; anything else replicated."""
    out = {}
    for k, v in batch.items():
        nd = np.ndim(v)
        logical = (None, "batch", "length")[:nd] + (None,) * max(0, nd - 3)
        out[k] = NamedSharding(mesh, logical_to_spec(logical, np.shape(v), mesh, rules))
    return out


def constrain(x: jax.Array, logical: Sequence[str | None], mesh: Mesh | None, rules: Rules) -> jax.Array:
    """``with_sharding_constraint`` by logical names (a no-op without a mesh)."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical, x.shape, mesh, rules)))


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None) -> Iterator[None]:
    """Make ``mesh`` the ambient mesh (a no-op for ``None``), so that model code
    that never names a mesh can find it: ``attention_impl='ring'`` reads the
    ``sequence`` axis from ``jax.sharding.get_abstract_mesh()``.

    Outside ``jit`` this is ``jax.set_mesh(mesh)`` (which JAX forbids while
    tracing); inside a traced function (e.g. around the model call in a loss)
    it is ``jax.sharding.use_abstract_mesh(mesh.abstract_mesh)``, which is
    what tracing reads. Meshes from ``make_mesh`` have Auto axes, so nothing
    else changes: shardings still come from ``in_shardings`` / ``constrain``.
    """
    if mesh is None:
        yield
        return
    try:
        ctx = jax.set_mesh(mesh)
    except ValueError:  # inside jit: only the abstract mesh may be set
        ctx = jax.sharding.use_abstract_mesh(mesh.abstract_mesh)
    with ctx:
        yield

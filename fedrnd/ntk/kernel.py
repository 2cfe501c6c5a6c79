"""Neural tangent kernels of client data without materialising the Jacobian.

For a model ``f(w, x) -> [C]`` logits, the per-sample, per-class Jacobian ``J_ic = df_c(x_i)/dw``
defines the class-averaged empirical NTK of NTK-DFL (Thompson et al., ICML 2025, eq. 6)

    ``H_ij = (1/C) sum_c J_ic . J_jc``          (``[n, n]``, ``n`` pooled samples)

A dense ``J`` is ``n x C x P`` floats (1,200 x 10 x 79,510 for the paper's MLP: 3.8 GB per
client), so for a stack of dense layers (:class:`fedrnd.models.DenseStack`) the kernel is built
from layer quantities instead. Layer ``l`` computes ``z_l = a_{l-1} W_l + b_l``; its Jacobian
block for sample ``i`` and class ``c`` is the outer product ``[a_{l-1,i}; 1] (x) delta_{l,ic}``
with ``delta_{l,ic} = df_c / dz_l`` (the back-propagated output sensitivity), hence

    ``J_ic^(l) . J_jc^(l) = ([a_i; 1] . [a_j; 1]) (delta_ic . delta_jc)``

and ``H = (1/C) sum_l (A_l A_l^T + 1) * (D_l D_l^T)`` with ``D_l`` the sensitivities flattened
to ``[n, C * width_l]``: two Gram matrices per layer, ``O(n^2 (d_in + C d_out))``.

Gaussian random projections (SPARK, Xia 2026) compress each layer's block to ``k_l`` numbers per
(sample, class): ``P_l = J^(l) R_l`` with ``R_l`` of i.i.d. ``N(0, 1/k_l)`` entries drawn from a
shared key (never sent). For a dense layer ``J^(l) R_l = sum_q delta_q (a R_l[:, q, :])``, so the
projection never forms ``J`` either (:func:`project_features`). ``E[R R^T] = I`` makes the
projected kernel an unbiased estimate of ``H`` with relative error ``O(1/sqrt(k))``
(Johnson-Lindenstrauss).

Dense Jacobians (:func:`dense_jacobian`) remain for small models and tests.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedrnd.models import Model

PyTree = Any


class LayerFeatures(NamedTuple):
    """What the structured kernel needs from one forward/backward pass of a dense stack.

    inputs: per layer ``[n, d_in + 1]`` layer inputs with a trailing 1 (the bias input).
    sens: per layer ``[n, C, d_out]`` sensitivities ``df_c / dz_l``.
    logits: ``[n, C]`` the outputs ``f(w, x)``.
    """

    inputs: tuple[jax.Array, ...]
    sens: tuple[jax.Array, ...]
    logits: jax.Array


def check_dense(model: Model) -> None:
    """Raise ``ValueError`` unless the structured kernel applies to ``model``."""
    if model.dense is None:
        raise ValueError(f"model {model.name!r} is not a dense stack (model.dense is None): the "
                         "structured NTK needs layer activations; use dense_jacobian for small "
                         "models")


def layer_features(model: Model, params: PyTree, x: jax.Array) -> LayerFeatures:
    """Layer inputs and back-propagated output sensitivities of a dense stack on ``x [n, ...]``."""
    check_dense(model)
    ds = model.dense
    n = x.shape[0]
    a = x.reshape(n, -1).astype(jnp.float32)
    ones = jnp.ones((n, 1), a.dtype)
    inputs, pre = [], []
    for i, name in enumerate(ds.layers):
        inputs.append(jnp.concatenate([a, ones], axis=1))
        z = a @ params[name]["kernel"] + params[name]["bias"]
        pre.append(z)
        if i < len(ds.layers) - 1:
            a = ds.activation(z)
    c = pre[-1].shape[-1]
    delta = jnp.broadcast_to(jnp.eye(c, dtype=a.dtype), (n, c, c))
    sens = [delta]
    for i in range(len(ds.layers) - 2, -1, -1):
        w_next = params[ds.layers[i + 1]]["kernel"]  # [d_i, d_{i+1}]
        z = pre[i]
        dact = jax.jvp(ds.activation, (z,), (jnp.ones_like(z),))[1]  # elementwise derivative
        delta = jnp.einsum("nco,ho->nch", delta, w_next) * dact[:, None, :]
        sens.append(delta)
    return LayerFeatures(tuple(inputs), tuple(reversed(sens)), pre[-1])


def _gram(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("ip,jp->ij", a, b, precision=jax.lax.Precision.HIGHEST)


def structured_kernel(fa: LayerFeatures, fb: LayerFeatures | None = None) -> jax.Array:
    """``H [n_a, n_b] = (1/C) sum_c J_c(a) J_c(b)^T`` from layer features, no Jacobian formed."""
    fb = fa if fb is None else fb
    c = fa.logits.shape[-1]
    h = 0.0
    for ia, sa, ib, sb in zip(fa.inputs, fa.sens, fb.inputs, fb.sens, strict=True):
        h = h + _gram(ia, ib) * _gram(sa.reshape(sa.shape[0], -1), sb.reshape(sb.shape[0], -1))
    return h / c


def flat_params(params: PyTree) -> jax.Array:
    return jnp.concatenate([p.reshape(-1) for p in jax.tree.leaves(params)])


def dense_jacobian(apply, params: PyTree, x: jax.Array) -> jax.Array:
    """``J [n, C, P]`` (leaves flattened in ``jax.tree.leaves`` order): small models and tests."""
    jac = jax.jacrev(lambda p: apply(p, x))(params)
    n, c = x.shape[0], None
    leaves = []
    for j in jax.tree.leaves(jac):
        c = j.shape[1]
        leaves.append(j.reshape(n, c, -1))
    return jnp.concatenate(leaves, axis=-1)


def dense_kernel(jac: jax.Array, jac_b: jax.Array | None = None) -> jax.Array:
    """``(1/C) sum_c J_c J_c^T`` from dense Jacobians ``[n, C, P]``."""
    jac_b = jac if jac_b is None else jac_b
    return jnp.einsum("icp,jcp->ij", jac, jac_b,
                      precision=jax.lax.Precision.HIGHEST) / jac.shape[1]


def jacobian_transpose(apply, params: PyTree, x: jax.Array, cot: jax.Array) -> PyTree:
    """``J^T cot`` for cotangents ``cot [..., n, C]`` (leading axes batched): one reverse pass.

    Returns a pytree like ``params`` with the leading axes of ``cot`` in front.
    """
    _, vjp = jax.vjp(lambda p: apply(p, x), params)
    lead = cot.shape[:-2]
    flat = cot.reshape((-1, *cot.shape[-2:]))
    out = jax.vmap(lambda r: vjp(r)[0])(flat)
    return jax.tree.map(lambda g: g.reshape((*lead, *g.shape[1:])), out)


# --- random projections (SPARK) -----------------------------------------------------------------

def layer_block_sizes(model: Model) -> tuple[tuple[int, int], ...]:
    """``(d_in + 1, d_out)`` of every dense layer (a layer's kernel and bias as one block)."""
    check_dense(model)
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return tuple((int(shapes[nm]["kernel"].shape[0]) + 1, int(shapes[nm]["kernel"].shape[1]))
                 for nm in model.dense.layers)


def projection_dims(model: Model, k: int) -> tuple[int, ...]:
    """``k_l = min(k, block size)``: a layer no larger than ``k`` is sent unprojected."""
    if not (isinstance(k, int | np.integer) and k >= 1):
        raise ValueError(f"projection dimension k must be an integer >= 1, got {k!r}")
    return tuple(min(int(k), p * q) for p, q in layer_block_sizes(model))


def draw_projections(key: jax.Array, model: Model, k: int) -> tuple[jax.Array | None, ...]:
    """Per layer ``R_l [d_in + 1, d_out, k_l]`` with i.i.d. ``N(0, 1/k_l)`` entries, or ``None``
    where ``k_l`` equals the block size (identity: that layer is sent exactly)."""
    out = []
    for i, ((p, q), kl) in enumerate(zip(layer_block_sizes(model), projection_dims(model, k),
                                         strict=True)):
        if kl == p * q:
            out.append(None)
        else:
            r = jax.random.normal(jax.random.fold_in(key, i), (p, q, kl), jnp.float32)
            out.append(r / jnp.sqrt(jnp.float32(kl)))
    return tuple(out)


def project_features(feats: LayerFeatures, proj: tuple[jax.Array | None, ...]) -> jax.Array:
    """Projected Jacobians ``[n, C, sum_l k_l]``: per layer ``J^(l) R_l``, never forming ``J``.

    A layer with ``R_l = None`` contributes its exact block ``[a; 1] (x) delta`` (flattened
    row-major over ``(d_in + 1, d_out)``).
    """
    parts = []
    for a, d, r in zip(feats.inputs, feats.sens, proj, strict=True):
        if r is None:
            n, c = d.shape[:2]
            parts.append(jnp.einsum("ip,icq->icpq", a, d).reshape(n, c, -1))
        else:
            t = jnp.einsum("ip,pqk->iqk", a, r)  # data x projection, shared by all classes
            parts.append(jnp.einsum("icq,iqk->ick", d, t))
    return jnp.concatenate(parts, axis=-1)


def unproject_update(model: Model, coef: jax.Array, proj: tuple[jax.Array | None, ...]
                     ) -> PyTree:
    """Weights from coefficients in the projected space: per layer ``R_l coef_l``.

    ``coef [..., sum_l k_l]`` (``P^T r`` for residual weights ``r``); returns a params-shaped
    pytree (leading axes of ``coef`` in front).
    """
    sizes = layer_block_sizes(model)
    lead = coef.shape[:-1]
    out, start = {}, 0
    for nm, (p, q), r in zip(model.dense.layers, sizes, proj, strict=True):
        kl = p * q if r is None else r.shape[-1]
        c = coef[..., start:start + kl]
        start += kl
        blk = c.reshape((*lead, p, q)) if r is None else jnp.einsum("pqk,...k->...pq", r, c)
        out[nm] = {"kernel": blk[..., :-1, :], "bias": blk[..., -1, :]}
    return out

"""Output evolution under a fixed kernel, solved inside JAX with a scanned fixed-step RK4.

NTK-DFL evolves the pooled outputs ``f [n, C]`` of the linearised model under gradient flow,

    ``df/dt = -(1/n) H r(f)``,   ``r(f) = softmax(f) - Y`` (cross-entropy) or ``f - Y`` (squared
    error),

from ``f(0) = f(X; w)``. Every explicit Runge-Kutta step is linear in ``H``, so the solver also
carries the *integrated residual* ``A(t)`` with ``f(t) = f(0) - (1/n) H A(t)`` exactly (up to
rounding). The weight change of the linearised model is then ``dw(t) = -(1/n) J^T A(t)``:
for a model linear in its parameters with a class-separable kernel the outputs at
``w + dw(t)`` equal ``f(t)``.

Rows with ``mask = 0`` (padding) have zero residual, so they stay at ``f(0)`` and ``A = 0``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSSES = ("ce", "mse")


def residual(f: jax.Array, y: jax.Array, loss: str) -> jax.Array:
    if loss == "ce":
        return jax.nn.softmax(f, axis=-1) - y
    if loss == "mse":
        return f - y
    raise ValueError(f"loss {loss!r} is unknown; allowed: {list(LOSSES)}")


def evolve(h: jax.Array, f0: jax.Array, y: jax.Array, mask: jax.Array, dt: jax.Array,
           num_steps: int, loss: str = "ce") -> tuple[jax.Array, jax.Array]:
    """RK4 on ``df/dt = -(1/n) H r(f)`` with ``n = sum(mask)``; ``num_steps`` steps of ``dt``.

    Args:
      h: ``[n_pad, n_pad]`` kernel. f0, y: ``[n_pad, C]`` initial outputs and targets.
      mask: ``[n_pad]`` 1 for real rows. dt: step (may be traced). num_steps: static.
    Returns:
      ``(f, a)``: ``[num_steps + 1, n_pad, C]`` outputs and integrated residuals at ``t = s dt``.
    """
    m = mask.astype(f0.dtype)[:, None]
    n = jnp.maximum(jnp.sum(mask.astype(f0.dtype)), 1.0)
    hn = h / n

    def rhs_res(a):  # residual at f(a) = f0 - H a / n
        return residual(f0 - hn @ a, y, loss) * m

    def step(a, _):
        k1 = rhs_res(a)
        k2 = rhs_res(a + 0.5 * dt * k1)
        k3 = rhs_res(a + 0.5 * dt * k2)
        k4 = rhs_res(a + dt * k3)
        a = a + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return a, a

    a0 = jnp.zeros_like(f0)
    _, traj = jax.lax.scan(step, a0, None, length=num_steps)
    a = jnp.concatenate([a0[None], traj], axis=0)
    f = f0[None] - jnp.einsum("ij,sjc->sic", hn, a)
    return f, a


def mse_closed_form(h: jax.Array, f0: jax.Array, y: jax.Array, t: float) -> jax.Array:
    """``f(t) = Y + exp(-t H / n) (f0 - Y)``: the squared-error ODE solved exactly (reference)."""
    n = f0.shape[0]
    evals, evecs = jnp.linalg.eigh(h / n)
    decay = jnp.exp(-t * evals)
    return y + evecs @ (decay[:, None] * (evecs.T @ (f0 - y)))

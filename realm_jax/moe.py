"""Mixture-of-experts MLP: routing per token, and the two ways to run the routed experts.

Shapes: B batch, T tokens, D width, E experts, k experts per token, Fe an expert's MLP width,
N = B*T tokens, M = N*k (token, expert) pairs.

**Routing** (``route``), as HF transformers computes it for Mixtral, Qwen2-MoE and Qwen3-MoE:
router logits ``h @ W_r`` ([B, T, E], in the activations' dtype), a float32 softmax over all E
experts, the k largest probabilities and their experts, renormalised to sum to 1 when
``cfg.norm_topk_prob`` (Mixtral always; Qwen when its config says so). The routing weights stay
float32 until the weighted sum of the k expert outputs.

**The experts**, each a gated MLP ``down(act(x @ gate) * (x @ up))``:

- ``ragged_experts``: the fast path. The M pairs are sorted by expert, so every expert's tokens
  form one contiguous group of ``group_sizes[e]`` rows; ``jax.lax.ragged_dot`` (through
  ``runtime.project_experts``, the runtime's one place that applies expert weights) multiplies
  each group by its own expert's weights, and the rows go back to their tokens, weighted and
  summed over k. The work is that of the chosen experts only.
- ``expert_parallel_experts``: the ragged path with the experts split over the mesh's ``model``
  axis (``sharding.py``): each device runs the pairs routed to its own E / m experts, and one
  all-reduce (``psum``) over ``model`` adds the devices' weighted partial sums.
- ``dense_experts``: the plain reference (what ``reference.forward_reference`` runs): every
  expert on every token, the outputs weighted by a dense [B, T, E] routing matrix that is zero
  off the chosen experts. E / k times the work; the test twin of the ragged path.

``shared_expert_scale``: Qwen2-MoE's gate on its shared expert (a dense MLP beside the experts),
``sigmoid(h @ w)`` per token.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from .config import ModelConfig
from .layers import gate

f32 = jnp.float32


def route(cfg: ModelConfig, h: jax.Array, router: jax.Array) -> tuple[jax.Array, jax.Array]:
    """h [B, T, D], router [D, E] -> (weights [B, T, k] float32, experts [B, T, k] int32).

    Softmax over every expert, then the top k (ties: the lower expert index first), then
    renormalised over the k when ``cfg.norm_topk_prob``."""
    logits = jnp.matmul(h, router.astype(h.dtype), preferred_element_type=f32).astype(h.dtype)
    probs = jax.nn.softmax(logits.astype(f32), axis=-1)
    weights, experts = jax.lax.top_k(probs, cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def shared_expert_scale(h: jax.Array, w: jax.Array) -> jax.Array:
    """h [B, T, D], w [D, 1] -> sigmoid(h @ w) [B, T, 1] in h.dtype (Qwen2-MoE's shared-expert gate)."""
    return jax.nn.sigmoid(jnp.matmul(h, w.astype(h.dtype), preferred_element_type=f32).astype(h.dtype))


def ragged_experts(h: jax.Array, weights: jax.Array, experts: jax.Array, num_experts: int,
                   apply: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """The routed experts' output [B, T, D] in h.dtype, each expert run on its own tokens only.

    h [B, T, D]; weights [B, T, k] float32 and experts [B, T, k] int32 from ``route``.
    ``apply(rows, group_sizes, row_experts) -> out``: rows [M, D] sorted by expert, group_sizes
    [E] int32 (rows of expert e are the e-th group), row_experts [M] int32 (each row's expert)
    -> out [M, D]: every row through its expert's MLP (``model``'s expert MLP over the runtime's
    ``Experts`` weights). Padding tokens are routed like any other (their rows are ignored later).
    """
    return _grouped(h, weights, experts, num_experts, apply).astype(h.dtype)


def _grouped(h, weights, experts, count: int, apply, first=None) -> jax.Array:
    """The weighted sum over k of the chosen experts' outputs, float32 [B, T, D] (``ragged_experts``).

    ``first`` (a traced int32, or None for all experts): only experts first .. first + count - 1
    (local index e - first, as ``apply`` sees them) are run; the pairs routed elsewhere sort
    after every local group, outside the groups, and count 0."""
    b, t, d = h.shape
    k = experts.shape[-1]
    flat = experts.reshape(-1)  # [M]: pair j is token j // k
    if first is not None:
        flat = flat - first
        mine = (flat >= 0) & (flat < count)
        flat = jnp.where(mine, flat, count)
        weights = jnp.where(mine.reshape(weights.shape), weights, 0.0)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=count + 1)[:count].astype(jnp.int32)
    rows = h.reshape(b * t, d)[order // k]
    which = flat[order]
    out = apply(rows, group_sizes, which if first is None else jnp.minimum(which, count - 1))  # [M, D], sorted
    if first is not None:  # rows past the groups: not this device's pairs, whatever ragged_dot left there
        out = jnp.where((which < count)[:, None], out, jnp.zeros((), out.dtype))
    out = out[jnp.argsort(order)].reshape(b, t, k, d)  # back to (token, choice) order
    return jnp.einsum("btkd,btk->btd", out.astype(f32), weights)


def expert_parallel_experts(h: jax.Array, weights: jax.Array, experts: jax.Array, num_experts: int,
                            apply: Callable, leaves, mesh) -> jax.Array:
    """``ragged_experts`` with the experts split over the mesh's ``model`` axis (expert parallel).

    ``leaves``: a pytree of the layer's expert weights (the runtime's ``Experts``), every array
    with E first, split over ``model`` (device j holds experts j*E/m .. (j+1)*E/m - 1);
    ``apply(rows, group_sizes, row_experts, leaves)`` as ``ragged_experts``' apply over the
    local experts (group_sizes [E/m], row_experts local indices). In a ``shard_map`` every device
    takes all its data shard's tokens and routing (computed beforehand, replicated over
    ``model``), runs the pairs routed to its own experts, weights them and sums over k in
    float32; one ``psum`` over ``model`` adds the devices' partial sums. The batch axis is on
    ``data`` when the data axis divides it, else every data replica takes the whole batch."""
    from jax.sharding import PartitionSpec as P

    from .sharding import DATA, MODEL

    count = num_experts // int(mesh.shape[MODEL])
    parts = int(mesh.shape[DATA])
    rows = P(DATA if parts > 1 and h.shape[0] % parts == 0 else None, None, None)
    specs = jax.tree_util.tree_map(lambda a: P(MODEL, *([None] * (a.ndim - 1))), leaves)

    def local(h, weights, experts, leaves):
        first = jax.lax.axis_index(MODEL).astype(jnp.int32) * count
        part = _grouped(h, weights, experts, count, lambda r, g, w: apply(r, g, w, leaves), first)
        return jax.lax.psum(part, MODEL)

    out = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, specs), out_specs=rows)(h, weights, experts, leaves)
    return out.astype(h.dtype)


def dense_experts(cfg: ModelConfig, h: jax.Array, weights: jax.Array, experts: jax.Array, w_gate: jax.Array,
                  w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """The routed experts' output [B, T, D] in h.dtype, every expert run on every token.

    h [B, T, D]; weights, experts [B, T, k] from ``route``; w_gate, w_up [E, D, Fe] and w_down
    [E, Fe, D] (canonical). Each expert's output is cast to h.dtype as the ragged path's is, then
    weighted by the dense routing matrix [B, T, E] (the chosen experts' weights, else 0)."""
    combine = jnp.einsum("btk,btke->bte", weights, jax.nn.one_hot(experts, cfg.num_experts, dtype=f32))
    dt = h.dtype
    g = jnp.einsum("btd,edf->btef", h, w_gate.astype(dt), preferred_element_type=f32).astype(dt)
    u = jnp.einsum("btd,edf->btef", h, w_up.astype(dt), preferred_element_type=f32).astype(dt)
    y = jnp.einsum("btef,efd->bted", gate(cfg, g) * u, w_down.astype(dt), preferred_element_type=f32).astype(dt)
    return jnp.einsum("bted,bte->btd", y.astype(f32), combine).astype(dt)

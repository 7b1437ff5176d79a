"""Weight-only int8 quantization as a params transform, run by the same ``forward``.

Each projection weight ``W [.., Din, Dout]`` becomes ``{"q": int8 [.., Din, Dout],
"scale": float32 [.., Dout]}`` with symmetric per-output-channel scales
``scale = max_i |W[i, :]| / 127`` and ``q = round(W / scale)``. ``layers.linear`` computes
``(x @ q) * scale`` (the int8 operand is widened to the activation dtype inside the matmul
fusion, so only int8 bytes are read from memory). Norms, biases and the embedding table stay
in their dtype (the embedding is a gather, and with tied embeddings it also serves as the head).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .errors import RealmError
from .layers import has_lora_rows

QUANTIZABLE = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")
SCHEMES = ("int8",)


def is_quantized(w) -> bool:
    return isinstance(w, dict) and ("q" in w or "qt" in w) and "scale" in w


def quantize_weight(w) -> dict:
    """w [.., Din, Dout] float -> {"q": int8 [.., Din, Dout], "scale": f32 [.., Dout]};
    the decode layout's transposed ``{"t": [.., Dout, Din]}`` -> ``{"qt": int8 [.., Dout, Din], "scale"}``."""
    if isinstance(w, dict) and "t" in w:
        q = quantize_weight(jnp.swapaxes(w["t"], -1, -2))
        return {"qt": jnp.swapaxes(q["q"], -1, -2), "scale": q["scale"]}
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=-2)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(wf / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale}


def dequantize_weight(w: dict, dtype=jnp.float32):
    """Inverse of ``quantize_weight`` (up to rounding): [.., Din, Dout] in ``dtype``
    (``{"t": [.., Dout, Din]}`` for the transposed form)."""
    if "qt" in w:
        back = dequantize_weight({"q": jnp.swapaxes(w["qt"], -1, -2), "scale": w["scale"]}, dtype)
        return {"t": jnp.swapaxes(back, -1, -2)}
    return (w["q"].astype(jnp.float32) * w["scale"][..., None, :]).astype(dtype)


def quantize(params: dict, scheme: str = "int8") -> dict:
    """Return params with every projection (and an untied ``lm_head``) int8-quantized
    (either layout: stacked, or the fused/unstacked ``model.decode_layout``).

    Pure and jittable; the input is not modified. Already-quantized leaves are kept.
    """
    if scheme not in SCHEMES:
        raise RealmError(f"quantize: scheme {scheme!r} is not supported; supported: {', '.join(SCHEMES)}")
    def quantize_layer(layer: dict) -> dict:
        folded = [k for k, v in layer.items() if has_lora_rows(v)]
        if folded:
            raise RealmError(f"quantize: {folded} have LoRA factors folded in (lora.fold_layout); quantize the "
                             f"original params and serve lora.decode_layout's adapters (int8 cannot hold them)")
        return {k: quantize_weight(v) if k in QUANTIZABLE and not is_quantized(v) else v
                for k, v in layer.items()}

    out = dict(params)
    layers = params["layers"]
    out["layers"] = (tuple(quantize_layer(lp) for lp in layers) if isinstance(layers, (tuple, list))
                     else quantize_layer(layers))
    if "lm_head" in params and not is_quantized(params["lm_head"]):
        out["lm_head"] = quantize_weight(params["lm_head"])
    return out


def dequantize(params: dict, dtype=jnp.float32) -> dict:
    """Replace every quantized leaf by its dequantized float weight."""
    def dequantize_layer(layer: dict) -> dict:
        return {k: dequantize_weight(v, dtype) if is_quantized(v) else v for k, v in layer.items()}

    out = dict(params)
    layers = params["layers"]
    out["layers"] = (tuple(dequantize_layer(lp) for lp in layers) if isinstance(layers, (tuple, list))
                     else dequantize_layer(layers))
    if "lm_head" in params and is_quantized(params["lm_head"]):
        out["lm_head"] = dequantize_weight(params["lm_head"], dtype)
    return out


def param_bytes(params: dict) -> int:
    """Bytes of all leaves (int8 counted as 1 byte): what a decode step reads at least."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))

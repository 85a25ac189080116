"""Naive TTT reference for tests: Python loops over batch, head, mini-batch and token with
materialised weights, its own LayerNorm and inner model, gradients by jax.grad of a per-token loss.
It shares no code with ttt_jax.ttt, so agreement with it is evidence, not tautology."""
import jax
import jax.numpy as jnp
import numpy as np


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / jnp.sqrt(var + eps) * w + b


def _fres(inner, w, x):
  h = x @ w["W1"] + w["b1"][0]
  if inner == "linear":
    return h
  return jax.nn.gelu(h, approximate=True) @ w["W2"] + w["b2"][0]


def naive_ttt(inner, params, xq, xk, xv, eta, mb, causal, eps=1e-8):
  """eta [B, H, S] or [B, H, S, mb]. Returns z [B, H, S, d] and final weights [B, H, ...]."""
  keys = ["W1", "b1"] + (["W2", "b2"] if inner == "mlp" else [])
  bsz, heads, seq, _ = xq.shape
  z = np.zeros(xq.shape)
  finals = {k: [] for k in keys}

  def tok_grad(w, lw, lb, k, v):
    loss = lambda w_: 0.5 * jnp.sum((_ln(_fres(inner, w_, k[None]), lw, lb, eps) - (v - k)) ** 2)
    return jax.grad(loss)(w)

  for bi in range(bsz):
    for h in range(heads):
      w = {k: jnp.asarray(params[k][h]) for k in keys}
      lw, lb = params["ln_weight"][h], params["ln_bias"][h]
      for start in range(0, seq, mb):
        toks = range(start, min(start + mb, seq))
        grads = [tok_grad(w, lw, lb, xk[bi, h, t], xv[bi, h, t]) for t in toks]

        def step(t_read, i_src, s):
          if eta.ndim == 4:
            return eta[bi, h, t_read, i_src]
          return eta[bi, h, s]

        def weights_after(t_read, upto):
          return {k: w[k] - sum(step(t_read, i, s) * grads[i][k]
                                for i, s in enumerate(toks) if i <= upto) for k in keys}

        last = len(toks) - 1
        for i, t in enumerate(toks):
          wt = weights_after(t, i) if causal else weights_after(toks[last], last)
          z[bi, h, t] = xq[bi, h, t] + _ln(_fres(inner, wt, xq[bi, h, t][None]), lw, lb, eps)[0]
        w = weights_after(toks[last], last)
      for k in keys:
        finals[k].append(np.asarray(w[k]))
  return z, {k: np.stack(v).reshape(bsz, heads, *v[0].shape) for k, v in finals.items()}

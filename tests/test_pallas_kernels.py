"""The fused Pallas TTT kernels (interpreted on CPU) against independent references.

References: `ttt_jax.ttt.ttt_scan(impl="grad")` (jax.grad of the inner loss, per-token weights
materialised for causal) for outputs and for every gradient, and the float64 golden vectors of the
public PyTorch TTT ops for the non-causal forward.
"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import ttt_scan_pallas
from ttt_jax.ttt import ttt_scan

DATA = pathlib.Path(__file__).parent / "data"


def _inputs(inner, batch, heads, seq, d, seed=0, eta_shape=None):
  """Random params (LayerNorm away from identity, so its gradients matter) and inputs.

  numpy, not jax.random: eager jax.random compiles once per shape, which dominates tiny tests.
  """
  rng = np.random.default_rng(seed)
  h = 4 * d if inner == "mlp" else d
  normal = lambda *shape, std=1.0: jnp.asarray(std * rng.standard_normal(shape), jnp.float32)
  params = {"W1": normal(heads, d, h, std=0.3), "b1": normal(heads, 1, h, std=0.1),
            "ln_weight": 1.0 + normal(heads, d, std=0.2), "ln_bias": normal(heads, d, std=0.1)}
  if inner == "mlp":
    params.update(W2=normal(heads, h, d, std=0.3), b2=normal(heads, 1, d, std=0.1))
  xq, xk, xv = (normal(batch, heads, seq, d) for _ in range(3))
  eta = jnp.asarray(0.2 * rng.uniform(size=eta_shape or (batch, heads, seq)), jnp.float32)
  return params, xq, xk, xv, eta


def _functional(outputs, seed):
  """A random linear functional of z and the final weights."""
  rng = np.random.default_rng(seed)
  return sum(jnp.sum(rng.standard_normal(a.shape).astype(np.float32) * a)
             for a in jax.tree.leaves(outputs))


def _assert_tree_close(got, want, rtol, atol):
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=rtol, atol=atol), got, want)


# tpu: the TPU kernels (sequence in HBM, explicit DMAs to VMEM) in Pallas' TPU interpreter;
# otherwise the generic kernels in the plain interpreter.
@pytest.mark.parametrize(
    "inner, causal, d, b, n_mb, group, per_source_eta, tpu",
    [
        ("mlp", False, 16, 4, 3, 2, False, False),  # the last group is shorter than the others
        ("mlp", True, 8, 8, 2, 1, True, False),  # eta [batch, heads, seq, b]
        ("linear", False, 8, 8, 3, 1, False, False),
        ("linear", True, 16, 4, 4, 2, False, True),
        ("mlp", False, 8, 4, 3, 2, False, True),
    ])
def test_forward_and_gradients_match_grad_reference(inner, causal, d, b, n_mb, group,
                                                    per_source_eta, tpu):
  seq = b * n_mb
  args = _inputs(inner, 2, 2, seq, d, eta_shape=(2, 2, seq, b) if per_source_eta else None)
  interpret = pltpu.InterpretParams() if tpu else True
  kernel = lambda *a: ttt_scan_pallas(inner, *a, mini_batch_size=b, causal=causal,
                                      checkpoint_group_size=group, interpret=interpret)
  ref = lambda *a: ttt_scan(inner, *a, mini_batch_size=b, causal=causal, impl="grad",
                            checkpoint_group_size=None)

  z, final = kernel(*args)
  z_ref, final_ref = ref(*args)
  assert z.shape == z_ref.shape and set(final) == set(final_ref)
  assert final["W1"].shape == (2, 2) + args[0]["W1"].shape[1:]
  _assert_tree_close((z, final), (z_ref, final_ref), rtol=1e-5, atol=1e-5)

  grads = jax.grad(lambda *a: _functional(kernel(*a), 1), argnums=range(5))(*args)
  grads_ref = jax.grad(lambda *a: _functional(ref(*a), 1), argnums=range(5))(*args)
  assert set(grads[0]) == set(args[0])
  _assert_tree_close(grads, grads_ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("inner", ["mlp", "linear"])
def test_matches_pytorch_golden_vectors(x64, inner):
  data = np.load(DATA / f"ttt_{inner}_noncausal.npz")
  params = {k[len("param_"):]: jnp.asarray(v) for k, v in data.items() if k.startswith("param_")}
  z, _ = ttt_scan_pallas(inner, params, *(jnp.asarray(data[k]) for k in ("xq", "xk", "xv", "eta")),
                         mini_batch_size=int(data["mini_batch_size"]), interpret=True)
  assert z.dtype == jnp.float64
  np.testing.assert_allclose(z, data["z"], rtol=1e-8, atol=1e-8)


def test_bf16_inputs_keep_fp32_state_and_gradients():
  inner, b = "mlp", 4
  params, xq, xk, xv, eta = _inputs(inner, 1, 2, 3 * b, 16, seed=5)
  bf16 = lambda a: a.astype(jnp.bfloat16)
  xs = tuple(bf16(a) for a in (xq, xk, xv))
  kernel = lambda p, *x: ttt_scan_pallas(inner, p, *x, eta, mini_batch_size=b, interpret=True)
  z, final = kernel(params, *xs)
  assert z.dtype == jnp.bfloat16 and final["W1"].dtype == jnp.float32
  # Reference on the same bf16-rounded inputs, all in fp32: bf16 matmul operands cost ~1e-2.
  xs32 = tuple(a.astype(jnp.float32) for a in xs)
  ref = lambda p, *x: ttt_scan(inner, p, *x, eta, mini_batch_size=b, impl="grad")
  z_ref, final_ref = ref(params, *xs32)
  np.testing.assert_allclose(z.astype(jnp.float32), z_ref, rtol=0, atol=5e-2)
  _assert_tree_close(final, final_ref, rtol=0, atol=2e-2)

  loss = lambda f: lambda p, *x: _functional(jax.tree.map(lambda a: a.astype(jnp.float32),
                                                          f(p, *x)), 4)
  grads = jax.grad(loss(kernel), argnums=range(4))(params, *xs)
  grads_ref = jax.grad(loss(ref), argnums=range(4))(params, *xs32)
  assert grads[1].dtype == jnp.bfloat16 and grads[0]["W1"].dtype == jnp.float32
  for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    g = np.asarray(g, np.float32)
    assert np.linalg.norm(g - g_ref) <= 0.02 * np.linalg.norm(g_ref)


def test_rejects_bad_inputs():
  params, xq, xk, xv, eta = _inputs("linear", 1, 1, 8, 8)
  with pytest.raises(ValueError, match="multiple of mini_batch_size"):
    ttt_scan_pallas("linear", params, xq, xk, xv, eta, mini_batch_size=3)
  with pytest.raises(ValueError, match="only meaningful with causal"):
    ttt_scan_pallas("linear", params, xq, xk, xv, jnp.ones((1, 1, 8, 4)), mini_batch_size=4)
  with pytest.raises(ValueError, match="inner must be"):
    ttt_scan_pallas("rnn", params, xq, xk, xv, eta, mini_batch_size=4)
  with pytest.raises(ValueError, match="checkpoint_group_size=None"):
    ttt_scan_pallas("linear", params, xq, xk, xv, eta, mini_batch_size=4,
                    checkpoint_group_size=None)

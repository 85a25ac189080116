"""ttt_scan against the public reference (golden), a naive float64 loop, and finite differences."""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.ttt import init_params, ttt_scan
from ttt_reference import naive_ttt

DATA = pathlib.Path(__file__).parent / "data"


def random_case(inner, key, batch=2, heads=2, seq=24, d=8, dtype=jnp.float64, eta_scale=0.3):
  ks = jax.random.split(key, 6)
  params = init_params(inner, ks[0], heads, d, dtype=dtype, std=0.3)
  params["ln_weight"] = 1 + 0.1 * jax.random.normal(ks[5], (heads, d), dtype)
  params["b1"] = params["b1"] + 0.1
  x = [jax.random.normal(k, (batch, heads, seq, d), dtype) for k in ks[1:4]]
  eta = eta_scale * jax.random.uniform(ks[4], (batch, heads, seq), dtype)
  return params, x, eta


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner,name", [("mlp", "ttt_mlp_noncausal"),
                                        ("linear", "ttt_linear_noncausal")])
@pytest.mark.parametrize("impl", ["grad", "dual"])
def test_matches_public_reference_golden(x64, inner, name, impl):
  g = dict(np.load(DATA / f"{name}.npz"))
  params = {k[len("param_"):]: jnp.asarray(v) for k, v in g.items() if k.startswith("param_")}
  z, final = ttt_scan(inner, params, g["xq"], g["xk"], g["xv"], g["eta"],
                      mini_batch_size=int(g["mini_batch_size"]), impl=impl)
  # The reference rounds its GELU-derivative constants: agreement to ~1e-9, not to the last bit.
  np.testing.assert_allclose(np.asarray(z), g["z"], rtol=0, atol=1e-9)
  assert final["W1"].shape == (g["xq"].shape[0],) + params["W1"].shape


@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq,mb", [(24, 8), (21, 4)])
def test_grad_and_dual_match_naive_loop(x64, inner, causal, seq, mb):
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(seq + mb), seq=seq)
  z_ref, final_ref = naive_ttt(inner, params, *map(np.asarray, (xq, xk, xv, eta)), mb, causal)
  for impl in ("grad", "dual"):
    z, final = ttt_scan(inner, params, xq, xk, xv, eta, mini_batch_size=mb, causal=causal,
                        impl=impl, checkpoint_group_size=2)
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-10, atol=1e-10, err_msg=impl)
    for k in final_ref:
      np.testing.assert_allclose(np.asarray(final[k]), final_ref[k], rtol=1e-10, atol=1e-10,
                                 err_msg=f"{impl} {k}")


@pytest.mark.parametrize("inner", ["mlp", "linear"])
def test_causal_per_source_eta_matches_naive_loop(x64, inner):
  """The [batch, heads, seq, mini_batch] eta of ttt-lm-jax's 1/(t+1) token-index scaling."""
  mb = 4
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(7), seq=12)
  scale = 1.0 / jnp.arange(1, mb + 1, dtype=eta.dtype)  # token t of a mini-batch: 1/(t+1)
  eta4 = jnp.tile(scale, 3)[None, None, :, None] * eta.reshape(2, 2, 3, 1, mb).repeat(
      mb, axis=3).reshape(2, 2, 12, mb)
  z_ref, final_ref = naive_ttt(inner, params, *map(np.asarray, (xq, xk, xv, eta4)), mb, True)
  for impl in ("grad", "dual"):
    z, final = ttt_scan(inner, params, xq, xk, xv, eta4, mini_batch_size=mb, causal=True,
                        impl=impl)
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(final["W1"]), final_ref["W1"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 32, 16, 8), (2, 2, 40, 8, 16)])
def test_grad_vs_dual_fp32(inner, causal, shape):
  batch, heads, seq, d, mb = shape
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(seq), batch, heads, seq, d,
                                          dtype=jnp.float32, eta_scale=0.05)
  run = lambda impl: ttt_scan(inner, params, xq, xk, xv, eta, mini_batch_size=mb,
                              causal=causal, impl=impl)
  (zg, fg), (zd, fd) = run("grad"), run("dual")
  assert zg.dtype == jnp.float32
  np.testing.assert_allclose(zd, zg, rtol=1e-5, atol=1e-5)
  for k in fg:
    np.testing.assert_allclose(fd[k], fg[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("impl,group", [("grad", 2), ("dual", 2), ("dual", None)])
@pytest.mark.parametrize("causal", [False, True])
def test_outer_gradients_match_finite_differences(x64, inner, impl, group, causal):
  """Gradients through the inner loop w.r.t. W0, ln params, eta and inputs (directional FD);
  impl="dual" runs the hand-derived backward, on re-run groups (2) or on the residuals the
  forward saved (None)."""
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(3), batch=1, heads=2, seq=12,
                                          d=4)
  args = (params, xq, xk, xv, eta)
  probe = jax.random.normal(jax.random.key(11), xq.shape, jnp.float64)

  def objective(params, xq, xk, xv, eta):
    z, final = ttt_scan(inner, params, xq, xk, xv, eta, mini_batch_size=4, impl=impl,
                        causal=causal, checkpoint_group_size=group)
    return jnp.sum(z * probe) + jnp.sum(jnp.sin(final["W1"]))

  objective = jax.jit(objective)
  grads = jax.jit(jax.grad(objective, argnums=tuple(range(5))))(*args)
  keys = jax.random.split(jax.random.key(5), 5)
  for i in range(5):
    direction = jax.tree.map(lambda a: jax.random.normal(keys[i], a.shape, a.dtype), args[i])
    shifted = lambda s: objective(*(jax.tree.map(lambda a, v: a + s * v, args[j], direction)
                                    if j == i else args[j] for j in range(5)))
    eps = 1e-5
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    analytic = sum(jnp.vdot(g, v) for g, v in zip(jax.tree.leaves(grads[i]),
                                                  jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8, err_msg=f"argument {i}")


def _all_gradients(inner, impl, args, mb, causal, group):
  """Gradients w.r.t. W0, the ln params, xq, xk, xv and eta of a random functional of z and the
  final weights."""
  def objective(params, xq, xk, xv, eta):
    z, final = ttt_scan(inner, params, xq, xk, xv, eta, mini_batch_size=mb, causal=causal,
                        impl=impl, checkpoint_group_size=group)
    probe = jnp.cos(jnp.arange(z.size, dtype=z.dtype).reshape(z.shape))
    return jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(final))

  return jax.jit(jax.grad(objective, argnums=tuple(range(5))))(*args)


def _assert_gradients_close(got, want, tol):
  """Every entry within tol of the reference, relative to the array's largest entry (or 1)."""
  names = ("params", "xq", "xk", "xv", "eta")
  for name, g, w in zip(names, got, want):
    assert jax.tree.structure(g) == jax.tree.structure(w), name
    for (path, a), b in zip(jax.tree.leaves_with_path(g), jax.tree.leaves(w)):
      assert a.dtype == b.dtype, (name, path)
      scale = max(1.0, float(jnp.max(jnp.abs(b))))
      np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=f"{name} {path}")


# seq 14 with mini-batch 4 pads two tokens; groups of 2 over 4 mini-batches and of 3 (a remainder
# group of 1) exercise the recompute; None keeps every mini-batch's residuals (no recompute).
@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq,group,per_source_eta", [(14, 2, False), (16, 3, False),
                                                      (14, None, False), (12, None, True)])
def test_dual_backward_matches_autodiff_float64(x64, inner, causal, seq, group, per_source_eta):
  """The hand-derived backward (dual.backward) against JAX's autodiff of impl="grad"."""
  if per_source_eta and not causal:
    pytest.skip("a per-source eta is causal only")
  mb = 4
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(seq), heads=2, seq=seq, d=4)
  if per_source_eta:
    eta = eta[..., None] * jnp.linspace(0.5, 1.5, mb, dtype=eta.dtype)
  args = (params, xq, xk, xv, eta)
  _assert_gradients_close(_all_gradients(inner, "dual", args, mb, causal, group),
                          _all_gradients(inner, "grad", args, mb, causal, group), 1e-10)


@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("group", [2, None])
def test_dual_backward_matches_autodiff_fp32(inner, causal, group):
  """seq 30 with mini-batch 8 pads two tokens."""
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(2), seq=30, d=8,
                                          dtype=jnp.float32, eta_scale=0.05)
  args = (params, xq, xk, xv, eta)
  _assert_gradients_close(_all_gradients(inner, "dual", args, 8, causal, group),
                          _all_gradients(inner, "grad", args, 8, causal, group), 1e-5)


@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_matmuls_keep_fp32_state(inner, causal):
  """matmul_dtype=bf16: bf16 operands, fp32 state and accumulation, forward and backward.

  bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 2e-3 per operand); through the scan's
  ~10 matmuls per mini-batch the outputs and gradients stay within 2% (relative norm) of fp32.
  """
  params, (xq, xk, xv), eta = random_case(inner, jax.random.key(6), seq=32, d=16,
                                          dtype=jnp.float32, eta_scale=0.05)
  args = (params, xq, xk, xv, eta)

  def run(matmul_dtype):
    f = lambda *a: ttt_scan(inner, *a, mini_batch_size=8, causal=causal, impl="dual",
                            matmul_dtype=matmul_dtype)
    out = jax.jit(f)(*args)
    loss = lambda *a: _functional_of(f(*a))
    return out, jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*args)

  (z16, final16), grads16 = run(jnp.bfloat16)
  (z32, final32), grads32 = run(None)
  assert z16.dtype == jnp.float32 and final16["W1"].dtype == jnp.float32
  assert grads16[0]["W1"].dtype == jnp.float32
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert 0 < rel(z16, z32) < 0.02  # > 0: the bf16 operands are really used
  for a, b in zip(jax.tree.leaves((final16, grads16)), jax.tree.leaves((final32, grads32))):
    assert rel(a, b) < 0.02
  with pytest.raises(ValueError, match="matmul_dtype"):
    ttt_scan(inner, *args, mini_batch_size=8, impl="grad", matmul_dtype=jnp.bfloat16)


def _functional_of(outputs):
  z, final = outputs
  probe = jnp.cos(jnp.arange(z.size, dtype=z.dtype).reshape(z.shape))
  return jnp.sum(z * probe) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(final))


@pytest.mark.parametrize("impl", ["grad", "dual"])
def test_checkpoint_groups_do_not_change_results(x64, impl):
  params, (xq, xk, xv), eta = random_case("mlp", jax.random.key(1), seq=56, eta_scale=0.05)

  def loss(params, xq, group):
    z, _ = ttt_scan("mlp", params, xq, xk, xv, eta, mini_batch_size=8, impl=impl,
                    checkpoint_group_size=group)
    return jnp.sum(z ** 2)

  run = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  ref = run(params, xq, None)
  for group in (1, 3):  # 7 mini-batches: 3 leaves a remainder group
    out = run(params, xq, group)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11, err_msg=f"group {group}")


def test_jit_vmap_and_bf16():
  params, (xq, xk, xv), eta = random_case("mlp", jax.random.key(4), seq=16, dtype=jnp.float32,
                                          eta_scale=0.05)
  f = jax.jit(functools.partial(ttt_scan, "mlp", mini_batch_size=8, impl="dual"))
  z, _ = ttt_scan("mlp", params, xq, xk, xv, eta, mini_batch_size=8)
  zj, _ = f(params, xq, xk, xv, eta)
  np.testing.assert_allclose(zj, z, rtol=1e-5, atol=1e-5)
  # vmap over an extra leading axis equals the loop over it.
  zv, _ = jax.vmap(lambda q: f(params, q, xk, xv, eta))(jnp.stack([xq, 2 * xq]))
  np.testing.assert_allclose(zv[1], f(params, 2 * xq, xk, xv, eta)[0], rtol=1e-5, atol=1e-5)
  # bf16 inputs: fp32 inner state, bf16 output close to the fp32 result.
  bf = lambda a: a.astype(jnp.bfloat16)
  zb, fb = f(params, bf(xq), bf(xk), bf(xv), bf(eta))
  assert zb.dtype == jnp.bfloat16 and fb["W1"].dtype == jnp.float32
  np.testing.assert_allclose(zb.astype(jnp.float32), z, rtol=0.05, atol=0.05)


def test_errors_are_clear():
  params, (xq, xk, xv), eta = random_case("linear", jax.random.key(0), seq=8, dtype=jnp.float32)
  with pytest.raises(ValueError, match="inner model"):
    ttt_scan("rnn", params, xq, xk, xv, eta, mini_batch_size=4)
  with pytest.raises(ValueError, match="impl"):
    ttt_scan("linear", params, xq, xk, xv, eta, mini_batch_size=4, impl="cuda")
  with pytest.raises(ValueError, match="xq, xk, xv"):
    ttt_scan("linear", params, xq, xk[:, :, :4], xv, eta, mini_batch_size=4)
  with pytest.raises(ValueError, match="eta"):
    ttt_scan("linear", params, xq, xk, xv, eta[..., :3], mini_batch_size=4)
  with pytest.raises(ValueError, match="only"):
    ttt_scan("linear", params, xq, xk, xv, jnp.zeros(eta.shape + (4,)), mini_batch_size=4)
  with pytest.raises(ValueError, match="keys"):
    ttt_scan("mlp", params, xq, xk, xv, eta, mini_batch_size=4)
  with pytest.raises(ValueError, match="checkpoint_group_size=None"):
    ttt_scan("linear", params, xq, xk, xv, eta, mini_batch_size=4, impl="pallas",
             checkpoint_group_size=None)


# Without groups, autodiff keeps every mini-batch's weights and activations and its own
# intermediates; impl="dual" keeps the weights and `dual.stored_residuals`, fewer, so groups of 8
# cut its growth by about 7x instead of 30x (the saved inputs grow either way).
@pytest.mark.parametrize("impl,max_ratio", [("grad", 0.1), ("dual", 0.2)])
def test_checkpoint_groups_bound_backward_memory(impl, max_ratio):
  """XLA's compiled temporaries for fwd+bwd: per-mini-batch residuals without groups, only
  group-boundary weights with them (16 -> 128 mini-batches)."""
  params = init_params("mlp", jax.random.key(0), 1, 16)

  def temp_bytes(seq, group):
    x, eta = jnp.ones((1, 1, seq, 16)), jnp.full((1, 1, seq), 1e-3)
    loss = lambda p, x: jnp.sum(ttt_scan("mlp", p, x, x, x, eta, mini_batch_size=8, impl=impl,
                                         checkpoint_group_size=group)[0])
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  growth_plain = temp_bytes(1024, None) - temp_bytes(128, None)
  growth_grouped = temp_bytes(1024, 8) - temp_bytes(128, 8)
  assert growth_plain > 0
  assert growth_grouped < max_ratio * growth_plain, (growth_grouped, growth_plain)


@pytest.mark.parametrize("inner", ["mlp", "linear"])
@pytest.mark.parametrize("causal", [False, True])
def test_dual_without_groups_does_not_rerun_the_forward(inner, causal):
  """Counting the matmuls of fwd+bwd: checkpoint_group_size=None runs the forward's once and two
  backward matmuls for each; groups (here of 1) run the forward's once more in the backward."""
  params = init_params(inner, jax.random.key(0), 1, 8)
  x, eta = jnp.ones((1, 1, 32, 8)), jnp.full((1, 1, 32), 1e-3)
  run = lambda p, x, group: ttt_scan(inner, p, x, x, x, eta, mini_batch_size=8, causal=causal,
                                     impl="dual", checkpoint_group_size=group)[0]
  count = lambda f: str(jax.make_jaxpr(f)(params, x)).count("dot_general")
  forward = count(lambda p, x: run(p, x, None))
  fwd_bwd = lambda group: count(jax.grad(lambda p, x: jnp.sum(run(p, x, group)), argnums=(0, 1)))
  assert forward > 0
  assert fwd_bwd(None) == 3 * forward
  assert fwd_bwd(1) == 4 * forward

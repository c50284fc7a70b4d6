"""The data-parallel train step on one device: in-place parameter updates without copies, and the same numbers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignrec_jax.train import parallel


def _loss(params, inputs, batch, axis_name):
  """A table read by two gradients (its own, and the projection kernel's), as AlignRec's feature table is."""
  del inputs, axis_name
  projected = jnp.tanh(params["table"] @ params["kernel"])
  value = jnp.sum(projected[batch["rows"]] ** 2)
  return value, {"loss": value, "table_mean": jnp.mean(params["table"])}


def _params():
  rng = np.random.default_rng(0)
  return {"table": jnp.asarray(rng.normal(size=(300, 128)), jnp.float32),
          "kernel": jnp.asarray(rng.normal(size=(128, 16)) * 0.1, jnp.float32)}


def _step(donate=True):
  tx = optax.adam(1e-2)
  devices = jax.local_devices()[:1]
  step = parallel.pmap_train_step(_loss, tx, devices) if donate else jax.jit(
      lambda p, s, i, b: parallel.train_step(p, s, i, b, loss_fn=_loss, tx=tx, axis_name=None))
  return step, tx


def test_single_device_step_updates_parameters_in_place_without_copies():
  step, tx = _step()
  params = _params()
  batch = {"rows": jnp.arange(8, dtype=jnp.int32)[None]}  # [1 device, 8]
  hlo = step.lower(params, tx.init(params), {}, batch).compile().as_text()
  copied = re.findall(r"= f32\[(\d+,\d+)\]\{[^}]*\} copy\(%\S*(table|kernel)", hlo)
  assert not copied, f"the compiled step copies donated parameters before updating them: {copied}"


def test_ordering_tie_keeps_the_numbers():
  step, tx = _step(donate=False)
  params = _params()
  batch = {"rows": jnp.arange(8, dtype=jnp.int32)}
  got_params, _, got_metrics = step(params, tx.init(params), {}, batch)
  grads, metrics = jax.grad(lambda p: _loss(p, {}, batch, None), has_aux=True)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  want_params = optax.apply_updates(params, updates)
  for k in params:
    # the tie adds an exact 0; only XLA's fusion of the jitted step may round differently
    np.testing.assert_allclose(np.asarray(got_params[k]), np.asarray(want_params[k]), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(got_metrics["loss"]), float(metrics["loss"]), rtol=1e-6)
  # a non-finite gradient entry stays in its own leaf: the tie is exactly 0, not NaN
  tied = parallel._after_all({"a": jnp.array([jnp.nan, 1.0]), "b": jnp.array([2.0, 3.0])})  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(tied["b"]), [2.0, 3.0])

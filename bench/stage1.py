"""Stage-1 speed, side by side: the JAX MMEnc (BEiT-3) against torchscale's BEiT3 in PyTorch on the same shapes.

  python bench/stage1.py                                 # base size (12 x 768), 224 px, 128 tokens, batch 2
  python bench/stage1.py --size=tiny --image_size=32 --patch_size=8 --text_len=32 --batch=64
  python bench/stage1.py --torch=false                   # JAX only
  python bench/stage1.py --compute_dtype=bfloat16         # the encoder's products in bfloat16 (pretrain.compute_dtype)

JAX: one ICA training step exactly as the trainer runs it (`pretrain.ica_share` in `parallel.pmap_train_step`, as
train/loop.py calls it: masks, MLM + MIM, AdamW, one device) and feature extraction (the jitted visual-[CLS]
forward of the joint input, items per second). PyTorch (when torch, torchscale and fairscale are importable; see
tests/fixtures/make_beit3_fixture.py for the install): the same BEiT3 (unilm's configuration) on the same shapes,
a forward with an MLM head tied to the text embedding on the masked half of the text positions (as the JAX step
and unilm's pre-training run it) and a linear pixel head on the patches, backward, AdamW step; and a no-grad
forward for extraction. Inputs are random (speed does not depend on content); compilation (the JAX step's first
two calls) and the first PyTorch step are excluded; the median of `--steps` timed steps is reported. Peak RSS is
the process's maximum so far, taken after the JAX part and after the PyTorch part.
Ratios: jax_train_speedup = torch step time / JAX step time, jax_extract_speedup = JAX items/s / torch items/s.
The hardware floor: the FLOPs of the compiled step (and of one extraction forward), as XLA's cost analysis of the
optimised executable counts them (every product, plus elementwise work; a loop's body once), over this machine's
GEMM rate (the median of timed `--gemm_size` square products in the step's compute dtype and matmul precision);
jax_train_over_floor = JAX step time / floor, jax_extract_over_floor likewise (1 = the step runs at GEMM speed).
Ends with ONE JSON line.
"""

import importlib.util
import json
import os
import resource
import statistics
import sys
import time

from absl import app
from absl import flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)
from alignrec_jax.train import distributed  # noqa: E402

distributed.configure_xla()  # before JAX starts its backend: the package itself sets no flags

_SIZE = flags.DEFINE_string("size", "base", "MMEnc size preset (models/mmenc.py SIZES)")
_IMAGE = flags.DEFINE_integer("image_size", 224, "image size in pixels")
_PATCH = flags.DEFINE_integer("patch_size", 16, "patch size in pixels")
_TEXT = flags.DEFINE_integer("text_len", 128, "text tokens per item")
_VOCAB = flags.DEFINE_integer("vocab", 64010, "vocabulary size (BEiT-3's sentencepiece: 64,010)")
_BATCH = flags.DEFINE_integer("batch", 2, "items per training step")
_EXTRACT_BATCH = flags.DEFINE_integer("extract_batch", 8, "items per extraction forward")
_STEPS = flags.DEFINE_integer("steps", 3, "timed steps of each kind (after one untimed warm-up)")
_TORCH = flags.DEFINE_bool("torch", True, "also time torchscale's BEiT3 when torch is importable")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default)")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "dtype of the JAX encoder's products (config.pretrain.compute_dtype)")
_PRECISION = flags.DEFINE_enum("matmul_precision", "highest", ["highest", "default"],
                               "precision of float32 products (config.pretrain.matmul_precision)")
_GEMM = flags.DEFINE_integer("gemm_size", 2048, "side of the square product that measures the GEMM rate")

PAD, CLS, SEP, MASK = 1, 0, 2, 3


def _peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(batch: int, seed: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, _VOCAB.value, (batch, _TEXT.value)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = CLS, SEP
  images = rng.integers(0, 256, (batch, _IMAGE.value, _IMAGE.value, 3), dtype=np.uint8)
  return images, tokens


def _timed(fn, steps: int, warmup: int = 1) -> float:
  """Median seconds of `steps` calls of `fn` after `warmup` untimed calls (which compile)."""
  start = time.perf_counter()
  for _ in range(warmup):
    fn()
  print(f"  warm-up (compile) {time.perf_counter() - start:.1f} s", flush=True)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  print("  timed: " + ", ".join(f"{t:.3f}" for t in times) + " s", flush=True)
  return statistics.median(times)


def _xla_flops(jitted, *args) -> float:
  """FLOPs of `jitted` on `args` by XLA's cost analysis of the optimised (compiled) executable."""
  cost = jitted.lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def _gemm_flops_per_s(n: int, dtype: str, precision: str) -> float:
  """This machine's rate on a square n x n product in `dtype` at `precision`: 2 n^3 / the median time."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in (0, 1))
  product = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
  print(f"GEMM {n} x {n} {dtype} ({precision}):", flush=True)
  return 2 * n ** 3 / _timed(lambda: jax.block_until_ready(product(a, b)), 5)


def bench_jax() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from alignrec_jax.losses import ica  # pylint: disable=g-import-not-at-top
  from alignrec_jax.models import mmenc  # pylint: disable=g-import-not-at-top
  from alignrec_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from alignrec_jax.train import pretrain  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top

  pre = base.get_base_config().pretrain
  pre.update(size=_SIZE.value, image_size=_IMAGE.value, patch_size=_PATCH.value, max_text_len=_TEXT.value,
             batch_size=_BATCH.value, compute_dtype=_DTYPE.value, matmul_precision=_PRECISION.value)
  model = mmenc.make_mmenc(pre, _VOCAB.value, PAD)
  params = pretrain.init_params(model, jax.random.key(0))
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  tx = pretrain.make_optimizer(pre, 1000)
  devices = jax.local_devices()[:1]
  loss_kwargs = dict(text_mask_ratio=pre.text_mask_ratio, image_mask_ratio=pre.image_mask_ratio,
                     mim_target=ica.MIM_TARGETS[pre.mim_target], mask_id=MASK, special_ids=(PAD, CLS, SEP))
  step_fn = parallel.pmap_train_step(pretrain.ica_share(model, loss_kwargs, 1), tx, devices)
  state = list(parallel.put_replicated((params, tx.init(params)), devices))
  images, tokens = _inputs(_BATCH.value, 0)
  batch = {"image": images[None], "tokens": tokens[None]}
  step = [0]

  def train():
    step[0] += 1
    batch["key"] = pretrain.device_keys(jax.random.key(0), step[0], 1)
    state[0], state[1], metrics = step_fn(state[0], state[1], None, batch)
    jax.block_until_ready(metrics)
  train_s = _timed(train, _STEPS.value, warmup=2)  # the second call compiles again for the step's own outputs
  step_flops = _xla_flops(step_fn, state[0], state[1], None, batch)

  features = jax.jit(lambda p, i, t: model.apply({"params": p}, mmenc.normalize_images(i), t, method=model.features))
  images, tokens = _inputs(_EXTRACT_BATCH.value, 1)
  host_params = jax.device_put(params, devices[0])
  extract_s = _timed(lambda: jax.block_until_ready(features(host_params, images, tokens)), _STEPS.value)
  extract_flops = _xla_flops(features, host_params, images, tokens)
  gemm = _gemm_flops_per_s(_GEMM.value, _DTYPE.value, _PRECISION.value)
  del ml_collections
  return {"backend": jax.default_backend(), "device": devices[0].device_kind, "params": n_params,
          "compute_dtype": _DTYPE.value, "matmul_precision": _PRECISION.value,
          "jax_train_s_per_step": train_s, "jax_train_items_per_s": _BATCH.value / train_s,
          "jax_extract_items_per_s": _EXTRACT_BATCH.value / extract_s, "peak_rss_mb_after_jax": _peak_rss_mb(),
          "flops_source": "xla_cost_analysis", "step_gflops": step_flops / 1e9,
          "extract_gflops_per_batch": extract_flops / 1e9, "gemm_size": _GEMM.value,
          "gemm_gflops_per_s": gemm / 1e9, "floor_s_per_step": step_flops / gemm,
          "jax_train_over_floor": train_s / (step_flops / gemm),
          "jax_extract_over_floor": extract_s / (extract_flops / gemm)}


def bench_torch() -> dict:
  """torchscale's BEiT3 forward/backward + AdamW, and the no-grad forward; {} without torch/torchscale."""
  spec = importlib.util.spec_from_file_location("_fixture", os.path.join(_REPO, "tests", "fixtures",
                                                                          "make_beit3_fixture.py"))
  fixture = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fixture)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    fixture._stub_timm()  # pylint: disable=protected-access
    from torchscale.architecture.config import EncoderConfig  # pylint: disable=g-import-not-at-top
    from torchscale.model.BEiT3 import BEiT3  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {"torch_skipped": f"{type(e).__name__}: {e}"}
  from alignrec_jax.models import mmenc  # pylint: disable=g-import-not-at-top
  if _THREADS.value:
    torch.set_num_threads(_THREADS.value)
  size = mmenc.SIZES[_SIZE.value]
  args = EncoderConfig(img_size=_IMAGE.value, patch_size=_PATCH.value, vocab_size=_VOCAB.value, multiway=True,
                       layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                       encoder_embed_dim=size["hidden"], encoder_attention_heads=size["heads"],
                       encoder_ffn_embed_dim=size["mlp"], encoder_layers=size["layers"])
  model = BEiT3(args)
  mim_head = torch.nn.Linear(size["hidden"], _PATCH.value * _PATCH.value * 3)
  opt = torch.optim.AdamW(list(model.parameters()) + list(mim_head.parameters()), lr=1e-4, weight_decay=0.05)
  images, tokens = _inputs(_BATCH.value, 0)
  img = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
  tok = torch.from_numpy(tokens).long()
  n_patches = (_IMAGE.value // _PATCH.value) ** 2
  masked = torch.rand(_BATCH.value, n_patches) < 0.4
  masked_text = torch.rand(_BATCH.value, _TEXT.value) < 0.5
  pad = tok == PAD
  pixel_target = torch.randn(_BATCH.value, n_patches, _PATCH.value * _PATCH.value * 3)

  def train():
    out = model(textual_tokens=tok, visual_tokens=img, text_padding_position=pad,
                vision_masked_position=masked)["encoder_out"]
    logits = out[:, 1 + n_patches:][masked_text] @ model.text_embed.weight.T
    mlm = torch.nn.functional.cross_entropy(logits, tok[masked_text])
    mim = ((mim_head(out[:, 1:1 + n_patches]) - pixel_target) ** 2).mean()
    opt.zero_grad()
    (mlm + mim).backward()
    opt.step()
  model.train()
  train_s = _timed(train, _STEPS.value)

  images, tokens = _inputs(_EXTRACT_BATCH.value, 1)
  img = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
  tok = torch.from_numpy(tokens).long()
  model.eval()

  def extract():
    with torch.no_grad():
      model(textual_tokens=tok, visual_tokens=img, text_padding_position=tok == PAD)["encoder_out"][:, 0].numpy()
  extract_s = _timed(extract, _STEPS.value)
  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "torch_train_s_per_step": train_s,
          "torch_train_items_per_s": _BATCH.value / train_s,
          "torch_extract_items_per_s": _EXTRACT_BATCH.value / extract_s,
          "peak_rss_mb_after_torch": _peak_rss_mb()}


def main(argv):
  del argv
  out = {"size": _SIZE.value, "image_size": _IMAGE.value, "patch_size": _PATCH.value, "text_len": _TEXT.value,
         "vocab": _VOCAB.value, "batch": _BATCH.value, "extract_batch": _EXTRACT_BATCH.value, "steps": _STEPS.value}
  out.update(bench_jax())
  print(f"JAX ({out['backend']}): train {out['jax_train_s_per_step']:.3f} s/step "
        f"({out['jax_train_items_per_s']:.2f} items/s), extraction {out['jax_extract_items_per_s']:.2f} items/s",
        flush=True)
  print(f"floor ({out['compute_dtype']}, {out['matmul_precision']}): {out['step_gflops']:.2f} GFLOP per step / "
        f"{out['gemm_gflops_per_s']:.1f} GFLOP/s GEMM = {out['floor_s_per_step']:.4f} s; step / floor "
        f"{out['jax_train_over_floor']:.2f}, extraction / floor {out['jax_extract_over_floor']:.2f}", flush=True)
  if _TORCH.value:
    out.update(bench_torch())
    if "torch_train_s_per_step" in out:
      out["jax_train_speedup"] = out["torch_train_s_per_step"] / out["jax_train_s_per_step"]
      out["jax_extract_speedup"] = out["jax_extract_items_per_s"] / out["torch_extract_items_per_s"]
      print(f"PyTorch {out['torch']} ({out['torch_threads']} threads): train {out['torch_train_s_per_step']:.3f} "
            f"s/step, extraction {out['torch_extract_items_per_s']:.2f} items/s", flush=True)
      print(f"ratios: JAX train step {out['jax_train_speedup']:.2f}x faster than PyTorch (target >= 1), "
            f"extraction {out['jax_extract_speedup']:.2f}x (target >= 1.5)", flush=True)
  print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}), flush=True)


if __name__ == "__main__":
  app.run(main)

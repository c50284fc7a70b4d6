"""Stage-2 epoch time against the number of devices (forced CPU devices here; real GPUs where there are several).

  python bench/scaling.py                       # 1, 2, 4, 8 forced CPU devices on lfm2k (or the default data)
  python bench/scaling.py --devices=1,2 --epochs=4 --config=configs/default.py

Each device count runs the real command line (`python -m alignrec_jax.main`, stage=train) in a fresh process with
`--xla_force_host_platform_device_count=N` (on a GPU host: the first N GPUs) and reads the per-epoch train times
from its results.json; the first epoch (compilation) is left out and the median of the others is reported. On a
2-core CPU more forced devices cannot be faster (they share the same cores); the bench shows the overhead of the
data-parallel step, and on GPUs its scaling. Ends with one JSON line: {"devices": [...], "epoch_s": [...]}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--epochs", type=int, default=4)
  shared = os.path.join(os.path.dirname(REPO), "shared", "data", "lfm2k")
  parser.add_argument("--config", default="configs/lfm2k.py" if os.path.isdir(shared) else "configs/default.py")
  parser.add_argument("--platform", default="cpu", help="cpu (forced host devices) or gpu")
  args = parser.parse_args()
  counts = [int(n) for n in args.devices.split(",")]
  epoch_s = []
  for n in counts:
    with tempfile.TemporaryDirectory() as workdir:
      env = dict(os.environ, JAX_PLATFORMS=args.platform)
      if args.platform == "cpu":
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
      cmd = [sys.executable, "-m", "alignrec_jax.main", f"--config={args.config}", f"--workdir={workdir}",
             "--config.stage=train", f"--config.train.epochs={args.epochs}", f"--config.train.num_devices={n}",
             "--config.train.stopping_step=1000"]
      proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
      if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
      with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        history = json.load(f)["history"]
    times = [h["train_s"] for h in history[1:]]
    epoch_s.append(round(statistics.median(times), 3))
    print(f"{n} device(s): median epoch {epoch_s[-1]:.3f}s over {len(times)} epochs (first epoch "
          f"{history[0]['train_s']:.1f}s incl. compilation)", flush=True)
  print(json.dumps({"config": args.config, "platform": args.platform, "devices": counts, "epoch_s": epoch_s}))


if __name__ == "__main__":
  main()

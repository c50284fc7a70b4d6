"""Training: the one loop of both stages (loop.py), stage 1 (pretrain.py), stage 2 (stage2.py), checkpoints
(state.py), the stage-1 -> stage-2 bridge (bridge.py), data parallelism (parallel.py), config checks (checks.py), one
workdir per run (workdir.py) and the multi-process runtime (distributed.py)."""

"""Preemption: SIGTERM or SIGINT during training ends the run at the next step with a checkpoint, not at once.

Preemptible TPU VMs and GPU spot instances send SIGTERM some time (30 s or more) before they stop the machine;
Ctrl-C sends SIGINT. While `listening()` is active (train/loop.py, around the training loop of both stages), such a
signal only sets a flag: the loop finishes the step it is in, writes a preemption checkpoint of the unfinished round
(state.Checkpointer.save_preempted), and raises `Preempted`. The entry points print one line and exit with
`EXIT_CODE`; rerunning the same command resumes at the next step and ends as an uninterrupted run would. A second
signal while the first is being handled restores the default behaviour (a second Ctrl-C stops at once).

Under `jax.distributed` every process must stop at the same step (the all-reduce of a step needs all of them):
there jax's preemption service (which catches SIGTERM itself and agrees on a step across processes,
multihost_utils.reached_preemption_sync_point) decides, and SIGINT keeps its default behaviour.
"""

import contextlib
import signal
import threading
from typing import Iterator, Optional

import jax

EXIT_CODE = 75  # sysexits.h EX_TEMPFAIL: a temporary failure, retry the same command (1 is a user error)


class Preempted(Exception):
  """The run stopped on a signal after writing a checkpoint; the message says where and how to resume."""


class _Listener:
  """Records the first SIGTERM/SIGINT of this process (one process) or asks jax's preemption service (several)."""

  def __init__(self):
    self.received: Optional[str] = None
    self.multi_process = jax.process_count() > 1

  def requested(self, step: int) -> Optional[str]:
    """The name of the signal that asks this run to stop after step `step`, or None. Called after every step with
    the run's step count (the same on every process)."""
    if self.multi_process:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      try:
        return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
      except RuntimeError:  # no preemption service in this jax.distributed set-up: nothing to listen to
        return None
    return self.received


@contextlib.contextmanager
def listening() -> Iterator[_Listener]:
  """Catches SIGTERM and SIGINT while active (main thread of a single-process run; elsewhere the listener only asks
  jax's service, or never fires), restoring the previous handlers on exit."""
  listener = _Listener()
  if listener.multi_process or threading.current_thread() is not threading.main_thread():
    yield listener
    return
  names = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}
  previous = {sig: signal.getsignal(sig) for sig in names}

  def handle(signum, frame):
    del frame
    if listener.received is not None:  # the second signal: stop at once, as without this handler
      for sig, handler in previous.items():
        signal.signal(sig, handler)
      signal.raise_signal(signum)
      return
    listener.received = names[signum]

  for sig in names:
    signal.signal(sig, handle)
  try:
    yield listener
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)

"""AlignRec's Fuser (docs/method.md §5.3): h = h_id + h_mm (plain sum), or h_id + h_mm / side_emb_div."""

import flax.linen as nn
import jax


class Fuser(nn.Module):
  """[n, d] ID view + [n, d] content view -> [n, d]. No parameters."""
  side_emb_div: float = 0.0  # 0 = plain sum (the reference default)

  def __call__(self, h_id: jax.Array, h_mm: jax.Array) -> jax.Array:
    if self.side_emb_div:
      return h_id + h_mm / self.side_emb_div
    return h_id + h_mm

"""The embedded default dataset: generated from a seed in seconds, nothing downloaded.

A latent topic model ties everything together:
  * `n_topics` topics; every item has one or two of them (item topic weights `z_i`, summing to 1);
  * every user has a Dirichlet topic preference `theta_u` (concentrated on a few topics);
  * items have a log-normal popularity `pop_i`;
  * each user draws `n_u >= 5` distinct items with probability proportional to
    `pop_i * (theta_u . z_i + floor)`, so both popularity and topic affinity matter;
  * each item gets a rendered `image_size` x `image_size` PNG (a shape and a colour per topic, on a noisy background
    with an occasional distractor) and a short text (words of its topics' vocabularies, filler words and a rare
    word of another topic): both carry its topics, neither perfectly.

Files written into `root` (MMRec layout, see data/mmrec.py and data/content.py):
  default.inter     userID, itemID, x_label (0/1/2 = train/valid/test), each user's items split 80/10/10 with at
                    least one valid and one test row per user
  items.tsv         itemID, text, image (path relative to the table)
  images/<id>.png   the rendered images
  image_feat.npy    [n_items, d] float32, a cheap content feature (a fixed random projection of 8x8-pooled pixels
                    concatenated with bag-of-words counts, plus noise) so that stage 2 runs without stage 1
  latent/*.npy      the generating truth (item topics and weights, user preferences, popularity), for analyses
  synthetic.json    the marker: generator version and parameters, written last

`ensure_synthetic_dataset` is idempotent (it returns at once when the marker matches) and atomic (the dataset is
built in a temporary folder beside `root` and renamed into place), so concurrent processes are safe.
"""

import json
import os

from absl import logging
import numpy as np
from PIL import Image, ImageDraw

from alignrec_jax.data import atomic
from alignrec_jax.data import mmrec
from alignrec_jax.data.mmrec import DataError
from alignrec_jax.errors import ConfigError

GENERATOR_VERSION = 1
NAME = "default"
MARKER = "synthetic.json"
DEFAULT_SIZES = {
    "n_users": 800,
    "n_items": 400,
    "n_topics": 10,
    "mean_interactions": 25,  # per user; each user has at least 5
    "image_size": 32,
}

# One vocabulary per topic (the topic order also fixes its colour and shape).
_TOPIC_WORDS = (
    ("ocean", "wave", "coral", "harbor", "tide", "sailor", "reef", "anchor"),
    ("forest", "pine", "moss", "trail", "cabin", "fern", "timber", "owl"),
    ("city", "tower", "subway", "neon", "street", "loft", "traffic", "skyline"),
    ("kitchen", "spice", "oven", "recipe", "bakery", "pasta", "skillet", "herb"),
    ("space", "orbit", "rocket", "comet", "galaxy", "lunar", "nebula", "probe"),
    ("music", "guitar", "rhythm", "chorus", "vinyl", "drum", "melody", "tempo"),
    ("sport", "soccer", "sprint", "racket", "stadium", "goal", "trophy", "league"),
    ("desert", "dune", "cactus", "oasis", "canyon", "sand", "mirage", "camel"),
    ("winter", "snow", "frost", "glacier", "sled", "blizzard", "parka", "icicle"),
    ("garden", "tulip", "bloom", "petal", "orchard", "seedling", "rose", "hedge"),
    ("machine", "gear", "engine", "piston", "circuit", "robot", "turbine", "bolt"),
    ("festival", "lantern", "parade", "confetti", "carnival", "mask", "firework", "costume"),
)
_FILLER_WORDS = ("the", "a", "with", "classic", "new", "set", "edition", "pack", "deluxe", "mini", "style", "original",
                 "for", "and", "of", "series", "collection", "premium", "vintage", "model")
_SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "hbars", "vbars", "dots", "checker", "xshape",
           "frame")
MAX_TOPICS = len(_TOPIC_WORDS)
AFFINITY_FLOOR = 0.03  # P(user u picks item i) ~ popularity_i * (theta_u . z_i + AFFINITY_FLOOR)


def _check_sizes(sizes: dict) -> dict:
  unknown = sorted(set(sizes) - set(DEFAULT_SIZES))
  if unknown:
    raise ConfigError(f"unknown synthetic dataset size(s) {unknown}; known: {sorted(DEFAULT_SIZES)}")
  params = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
  if not 2 <= params["n_topics"] <= MAX_TOPICS:
    raise ConfigError(f"n_topics must be in [2, {MAX_TOPICS}], got {params['n_topics']}")
  if params["n_users"] < 2:
    raise ConfigError(f"n_users must be at least 2, got {params['n_users']}")
  if params["n_items"] < 4 * params["n_topics"]:
    raise ConfigError(f"n_items must be at least 4 * n_topics = {4 * params['n_topics']}, got {params['n_items']}")
  if not 5 <= params["mean_interactions"] <= params["n_items"] // 3:
    raise ConfigError(f"mean_interactions must be in [5, n_items // 3 = {params['n_items'] // 3}], got "
                      f"{params['mean_interactions']}")
  if not 16 <= params["image_size"] <= 256:
    raise ConfigError(f"image_size must be in [16, 256], got {params['image_size']}")
  return params


# ------------------------------------------------------------------------------------------------- the latent model

def _topic_colours(n_topics: int) -> np.ndarray:
  """[n_topics, 3] uint8: evenly spaced saturated hues."""
  hues = np.arange(n_topics) / n_topics
  rgb = np.stack([np.clip(np.abs((hues * 6 + offset) % 6 - 3) - 1, 0, 1) for offset in (0, 4, 2)], axis=1)
  return (40 + 200 * rgb).astype(np.uint8)


def _item_topics(rng: np.random.Generator, n_items: int, n_topics: int) -> tuple[np.ndarray, np.ndarray]:
  """Topic ids [n_items, 2] (second = -1 when the item has one topic) and weights z [n_items, n_topics]."""
  primary = rng.integers(0, n_topics, n_items)
  secondary = (primary + rng.integers(1, n_topics, n_items)) % n_topics
  secondary = np.where(rng.random(n_items) < 0.4, secondary, -1)
  z = np.zeros((n_items, n_topics))
  z[np.arange(n_items), primary] = 1.0
  two = secondary >= 0
  z[two, primary[two]] = 0.6
  z[two, secondary[two]] = 0.4
  return np.stack([primary, secondary], axis=1), z


def _interactions(rng: np.random.Generator, z: np.ndarray, n_users: int, mean_interactions: int
                  ) -> tuple[list, np.ndarray, np.ndarray]:
  """Draws the interactions.

  Returns:
    per-user item arrays, theta [n_users, n_topics], popularity [n_items].
  """
  n_items, n_topics = z.shape
  theta = rng.dirichlet(np.full(n_topics, 0.25), size=n_users)
  popularity = np.exp(0.9 * rng.standard_normal(n_items))
  # A small floor lets users stray off their topics; popularity multiplies in as a skew.
  log_w = np.log(popularity)[None, :] + np.log(theta @ z.T + AFFINITY_FLOOR)
  gumbel = rng.gumbel(size=log_w.shape)  # Gumbel top-k = sampling without replacement
  order = np.argsort(-(log_w + gumbel), axis=1, kind="stable")
  counts = 5 + rng.geometric(1.0 / (mean_interactions - 4), size=n_users) - 1
  counts = np.minimum(counts, n_items // 2)
  return [order[u, :counts[u]] for u in range(n_users)], theta, popularity


def _split(rng: np.random.Generator, items_per_user: list, theta: np.ndarray, z: np.ndarray
           ) -> dict[str, np.ndarray]:
  """80/10/10 per user (at least one valid and one test item each); every item gets at least one train row."""
  pairs = {"train": [], "valid": [], "test": []}
  for u, items in enumerate(items_per_user):
    items = rng.permutation(items)
    n = len(items)
    n_valid = max(1, int(round(0.1 * n)))
    n_test = max(1, int(round(0.1 * n)))
    n_train = n - n_valid - n_test
    for name, chunk in (("train", items[:n_train]), ("valid", items[n_train:n_train + n_valid]),
                        ("test", items[n_train + n_valid:])):
      pairs[name].append(np.stack([np.full(len(chunk), u), chunk], axis=1))
  pairs = {k: np.concatenate(v).astype(np.int64) for k, v in pairs.items()}
  # Items nobody trained on would be cold (and the last id would shrink n_items): give each one train row from the
  # user who likes its topics most among those who do not have it yet.
  n_items = z.shape[0]
  seen = np.zeros((len(items_per_user), n_items), bool)
  for rows in pairs.values():
    seen[rows[:, 0], rows[:, 1]] = True
  cold = np.flatnonzero(np.bincount(pairs["train"][:, 1], minlength=n_items) == 0)
  extra = []
  for i in cold:
    affinity = np.where(seen[:, i], -np.inf, theta @ z[i])
    u = int(np.argmax(affinity))
    seen[u, i] = True
    extra.append((u, i))
  if extra:
    pairs["train"] = np.concatenate([pairs["train"], np.asarray(extra, np.int64)])
  for name in pairs:  # user-major, as the files MMRec ships are
    rows = pairs[name]
    pairs[name] = rows[np.lexsort((rows[:, 1], rows[:, 0]))]
  return pairs


# ------------------------------------------------------------------------------------------------- content

def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, colour: tuple) -> None:
  x0, y0, x1, y1 = box
  w, h = x1 - x0, y1 - y0
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  t = max(1, int(min(w, h) / 5))
  if shape == "disc":
    draw.ellipse(box, fill=colour)
  elif shape == "square":
    draw.rectangle(box, fill=colour)
  elif shape == "triangle":
    draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
  elif shape == "cross":
    draw.rectangle((cx - t, y0, cx + t, y1), fill=colour)
    draw.rectangle((x0, cy - t, x1, cy + t), fill=colour)
  elif shape == "ring":
    draw.ellipse(box, outline=colour, width=t)
  elif shape == "diamond":
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
  elif shape == "hbars":
    for y in range(int(y0), int(y1), 2 * t):
      draw.rectangle((x0, y, x1, y + t - 1), fill=colour)
  elif shape == "vbars":
    for x in range(int(x0), int(x1), 2 * t):
      draw.rectangle((x, y0, x + t - 1, y1), fill=colour)
  elif shape == "dots":
    for y in range(int(y0), int(y1), 2 * t):
      for x in range(int(x0), int(x1), 2 * t):
        draw.ellipse((x, y, x + t, y + t), fill=colour)
  elif shape == "checker":
    for j, y in enumerate(range(int(y0), int(y1), t + 1)):
      for k, x in enumerate(range(int(x0), int(x1), t + 1)):
        if (j + k) % 2 == 0:
          draw.rectangle((x, y, x + t, y + t), fill=colour)
  elif shape == "xshape":
    draw.line((x0, y0, x1, y1), fill=colour, width=t)
    draw.line((x0, y1, x1, y0), fill=colour, width=t)
  elif shape == "frame":
    draw.rectangle(box, outline=colour, width=t)
  else:  # pragma: no cover  (the shape list above is fixed)
    raise ValueError(f"unknown shape {shape!r}")


def _render(rng: np.random.Generator, topics: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
  """One item image, uint8 [size, size, 3]: its topics' shapes in their colours, plus background and noise."""
  background = tuple(int(c) for c in rng.integers(150, 235, 3))
  img = Image.new("RGB", (size, size), background)
  draw = ImageDraw.Draw(img)
  if rng.random() < 0.3:  # a distractor blob in a random colour
    x, y = rng.integers(0, size - size // 4, 2)
    draw.ellipse((x, y, x + size // 4, y + size // 4), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
  for rank, t in enumerate(topics):
    if t < 0:
      continue
    extent = int(size * (rng.uniform(0.5, 0.8) if rank == 0 else rng.uniform(0.3, 0.5)))
    x, y = rng.integers(0, size - extent + 1, 2)
    colour = np.clip(colours[t].astype(int) + rng.integers(-25, 26, 3), 0, 255)
    _draw_shape(draw, _SHAPES[t % len(_SHAPES)], (int(x), int(y), int(x + extent - 1), int(y + extent - 1)),
                tuple(int(c) for c in colour))
  pixels = np.asarray(img, dtype=np.float64) + rng.normal(0.0, 14.0, (size, size, 3))
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def _text(rng: np.random.Generator, topics: np.ndarray, n_topics: int) -> str:
  """A short text: 3-6 words of the item's topics, 3-6 filler words, sometimes a word of another topic."""
  own = [t for t in topics if t >= 0]
  n_topic_words = int(rng.integers(3, 7))
  weights = np.array([0.6, 0.4]) if len(own) == 2 else np.array([1.0])
  picked = rng.choice(len(own), size=n_topic_words, p=weights)
  words = [_TOPIC_WORDS[own[k]][rng.integers(0, len(_TOPIC_WORDS[own[k]]))] for k in picked]
  words += [_FILLER_WORDS[k] for k in rng.integers(0, len(_FILLER_WORDS), int(rng.integers(3, 7)))]
  if rng.random() < 0.3:
    other = int(rng.integers(0, n_topics))
    words.append(_TOPIC_WORDS[other][rng.integers(0, len(_TOPIC_WORDS[other]))])
  return " ".join(words[k] for k in rng.permutation(len(words)))


def _content_features(rng: np.random.Generator, images: np.ndarray, texts: list, n_topics: int) -> np.ndarray:
  """[n_items, 48 + vocab] float32: projected 8x8-pooled pixels and bag-of-words counts, each block scaled to unit
  mean row norm, plus Gaussian noise."""
  n, size = images.shape[:2]
  cell = size // 8
  pooled = images[:, :cell * 8, :cell * 8].astype(np.float64).reshape(n, 8, cell, 8, cell, 3).mean(axis=(2, 4))
  pooled = pooled.reshape(n, -1) / 255.0
  pooled -= pooled.mean(axis=0)
  projection = rng.standard_normal((pooled.shape[1], 48)) / np.sqrt(pooled.shape[1])
  image_part = pooled @ projection
  vocab = sorted({w for words in _TOPIC_WORDS[:n_topics] for w in words} | set(_FILLER_WORDS))
  index = {w: k for k, w in enumerate(vocab)}
  text_part = np.zeros((n, len(vocab)))
  for i, text in enumerate(texts):
    for word in text.split():
      text_part[i, index[word]] += 1.0
  blocks = []
  for block in (image_part, text_part):
    block = block / np.linalg.norm(block, axis=1).mean()
    blocks.append(block + rng.normal(0.0, 0.5 / np.sqrt(block.shape[1]), block.shape))
  return np.concatenate(blocks, axis=1).astype(np.float32)


# ------------------------------------------------------------------------------------------------- files

def _build(directory: str, seed: int, params: dict) -> None:
  """Writes the whole dataset into an empty `directory`."""
  # Independent streams so that changing, e.g., the image renderer does not reshuffle the interactions.
  streams = np.random.SeedSequence([seed, GENERATOR_VERSION]).spawn(5)
  rng_topics, rng_inter, rng_split, rng_content, rng_feat = (np.random.default_rng(s) for s in streams)
  n_items, n_topics, size = params["n_items"], params["n_topics"], params["image_size"]

  topics, z = _item_topics(rng_topics, n_items, n_topics)
  items_per_user, theta, popularity = _interactions(rng_inter, z, params["n_users"], params["mean_interactions"])
  pairs = _split(rng_split, items_per_user, theta, z)
  mmrec.write_inter(os.path.join(directory, f"{NAME}.inter"), pairs)

  colours = _topic_colours(n_topics)
  os.makedirs(os.path.join(directory, "images"))
  images = np.zeros((n_items, size, size, 3), np.uint8)
  texts = []
  for i in range(n_items):
    images[i] = _render(rng_content, topics[i], colours, size)
    texts.append(_text(rng_content, topics[i], n_topics))
    Image.fromarray(images[i]).save(os.path.join(directory, "images", f"{i:05d}.png"), optimize=False)
  with open(os.path.join(directory, "items.tsv"), "w", encoding="utf-8") as f:
    f.write("itemID\ttext\timage\n")
    for i, text in enumerate(texts):
      f.write(f"{i}\t{text}\timages/{i:05d}.png\n")
  np.save(os.path.join(directory, "image_feat.npy"), _content_features(rng_feat, images, texts, n_topics))
  # The latent truth, for analyses and tests (no loader reads it): item topic ids [n_items, 2] (-1 = none) and
  # weights z [n_items, n_topics], user preferences theta [n_users, n_topics], item popularity [n_items].
  # Plain .npy files: np.savez stamps the zip entries with the current time, which would break byte equality.
  os.makedirs(os.path.join(directory, "latent"))
  for name, array in (("item_topics", topics.astype(np.int32)), ("item_weights", z), ("user_theta", theta),
                      ("popularity", popularity)):
    np.save(os.path.join(directory, "latent", f"{name}.npy"), array)
  with open(os.path.join(directory, MARKER), "w", encoding="utf-8") as f:
    json.dump(_marker(seed, params), f, indent=1, sort_keys=True)


def _marker(seed: int, params: dict) -> dict:
  return {"generator": "alignrec_jax.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
          "params": params}


def _read_marker(root: str):
  try:
    with open(os.path.join(root, MARKER), "r", encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def ensure_synthetic_dataset(root: str, seed: int = 0, **sizes) -> str:
  """Generates the default dataset into `root` unless it is already there with the same version and parameters.

  Args:
    root: target folder (created; `~` is expanded). If it exists it must be an earlier output of this generator or
      empty: other files are never deleted.
    seed: generator seed; the same seed and sizes give byte-identical files.
    **sizes: overrides of DEFAULT_SIZES (n_users, n_items, n_topics, mean_interactions, image_size).

  Returns:
    The dataset folder (absolute); the interactions are `<root>/default.inter`.
  """
  params = _check_sizes(sizes)
  root = os.path.abspath(os.path.expanduser(root))
  wanted = _marker(seed, params)
  if _read_marker(root) == wanted:
    return root
  if os.path.isdir(root) and os.listdir(root) and _read_marker(root) is None:
    raise DataError(f"{root} is not empty and holds no {MARKER} from this generator: refusing to replace it with "
                    "the synthetic dataset (choose another --config.data.root)")
  logging.info("Generating the synthetic dataset (seed %d, %s) into %s", seed, params, root)
  with atomic.atomic_dir(root) as tmp:  # an older version or an empty folder is replaced whole
    _build(tmp, seed, params)
  return root

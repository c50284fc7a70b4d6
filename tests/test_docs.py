"""The README and docs/ stay short, runnable and linked: size, the two commands CI reads, every relative link.

Pure Python (no JAX), well under a second.
"""

import glob
import os
import re

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO_ROOT, "README.md")
DOCS = sorted([README] + glob.glob(os.path.join(REPO_ROOT, "docs", "*.md")))
MARKERS = ("<!-- main-command -->", "<!-- test-command -->")

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"(`+).+?\1")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def _prose_lines(text):
  """(line number, line) of the lines outside fenced code blocks."""
  inside = False
  for n, line in enumerate(text.splitlines(), 1):
    if _FENCE.match(line):
      inside = not inside
      continue
    if not inside:
      yield n, line


def github_slug(heading):
  """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation but '-' and '_' removed, spaces -> '-'."""
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays, its target goes
  text = text.strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path):
  """Every heading anchor of a Markdown file, repeated headings numbered -1, -2, ... as GitHub does."""
  seen = {}
  out = set()
  for _, line in _prose_lines(_read(path)):
    m = _HEADING.match(line)
    if not m:
      continue
    slug = github_slug(m.group(2))
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    out.add(slug if count == 0 else f"{slug}-{count}")
  return out


def relative_links(path):
  """(line number, target) of every relative Markdown link outside code."""
  for n, line in _prose_lines(_read(path)):
    for m in _LINK.finditer(_CODE_SPAN.sub("", line)):
      target = m.group(1)
      if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:, ...
        continue
      yield n, target


def _all_links():
  return [(os.path.relpath(p, REPO_ROOT), n, t) for p in DOCS for n, t in relative_links(p)]


def _ci_extract(text, marker):
  """What .ci/run's awk '/marker/{getline; getline; print; exit}' prints: the line two below the marker."""
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if marker in line:
      return lines[i + 2] if i + 2 < len(lines) else ""
  return ""


def test_readme_is_at_most_8_kib():
  size = os.path.getsize(README)
  assert size <= 8192, f"README.md is {size} bytes; it must stay at most 8192 (move detail to docs/)"


@pytest.mark.parametrize("marker", MARKERS)
def test_each_command_marker_is_followed_by_a_one_line_fenced_block(marker):
  lines = _read(README).splitlines()
  found = [i for i, line in enumerate(lines) if marker in line]
  assert len(found) == 1, f"README.md must hold {marker} exactly once, found {len(found)}"
  i = found[0]
  block = lines[i + 1:i + 4]
  assert len(block) == 3 and block[0] == "```" and block[2] == "```", (
      f"{marker} must be followed by ``` / one command line / ```, found {block}")
  assert block[1].strip(), f"the command after {marker} is empty"


def test_ci_runs_the_readme_test_command_and_it_runs_pytest_on_tests():
  ci = _read(os.path.join(REPO_ROOT, ".ci", "run"))
  assert "awk '/<!-- test-command -->/{getline; getline; print; exit}' README.md" in ci
  command = _ci_extract(_read(README), "<!-- test-command -->")
  assert re.search(r"-m pytest tests\b", command), f"command 2 must run pytest on tests/, is {command!r}"
  assert "requirements-test.txt" in command


def test_main_command_runs_the_default_config():
  command = _ci_extract(_read(README), "<!-- main-command -->")
  assert "-m alignrec_jax.main" in command and "--config=configs/default.py" in command, command
  assert "requirements.txt" in command


def test_every_relative_link_names_an_existing_file():
  missing = []
  for doc, n, target in _all_links():
    path = target.split("#", 1)[0]
    if path and not os.path.exists(os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(doc), path))):
      missing.append(f"{doc}:{n}: {target}")
  assert not missing, "links to files that do not exist:\n" + "\n".join(missing)


def test_every_anchor_names_a_heading_of_its_target():
  broken = []
  for doc, n, target in _all_links():
    if "#" not in target:
      continue
    path, anchor = target.split("#", 1)
    file = os.path.normpath(os.path.join(REPO_ROOT, os.path.dirname(doc), path)) if path else os.path.join(
        REPO_ROOT, doc)
    if os.path.isfile(file) and anchor not in anchors(file):
      broken.append(f"{doc}:{n}: {target}")
  assert not broken, "anchors without a heading of that GitHub slug:\n" + "\n".join(broken)


def test_slugs_follow_github_rules():
  assert github_slug("Stage 2 against the reference on lfm2k") == "stage-2-against-the-reference-on-lfm2k"
  assert github_slug("8.2 Where content matters: cold-start items") == "82-where-content-matters-cold-start-items"
  assert github_slug("New items (`Run.add_items`, `--add_items=FILE`)") == "new-items-runadd_items---add_itemsfile"
  assert github_slug("MMEnc against torchscale's BEiT-3") == "mmenc-against-torchscales-beit-3"

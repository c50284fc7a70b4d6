"""Evaluation: MMRec-exact full ranking (ranking.py) and the paper's intermediate evaluations (probes.py)."""

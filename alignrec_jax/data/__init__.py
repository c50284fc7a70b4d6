"""Loading and generating data: MMRec files (mmrec.py), raw item content (content.py), synthetic data."""

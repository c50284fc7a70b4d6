"""Baseline recommenders under AlignRec's protocol: one file per model, each registered by name.

Every module here registers one `baseline.Baseline` (a `Recommender`, alignrec_jax/models/__init__.py) with
`@register(name)`; `get_model` imports every module of this package, so adding a baseline means adding one file.
Its hyper-parameters are its `defaults` (config.model.<name>.<key>, e.g. --config.model.freedom.dropout=0.9) and its
search grid is its `grid` ({"optim.lr": [...], "model.<name>.<key>": [...]} for compare --grid). What they share
is in baseline.py.
"""

"""Scaling-law experiments: plan an IsoFLOP grid (plan.py), run it (run.py), fit and plot laws
(fit.py, plot.py); ``seqtrain scaling ...`` (cli.py)."""

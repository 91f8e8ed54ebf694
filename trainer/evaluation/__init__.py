"""Evaluation and inference: sampling and translation from a checkpoint of any layout
(``inference``), decoding metrics and classifier accuracy and character error rates during
training (``decode``, ``examples``), BLEU/chrF/exact match
(``metrics``). ``seqtrain generate``, ``eval`` and ``tools/evaluate.py`` build on it.

May import: everything below the callbacks (checkpoints, data's tokenizers, the loop's types).
"""

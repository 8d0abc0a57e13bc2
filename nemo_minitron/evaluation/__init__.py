"""Evaluation: held-out loss and perplexity (the ``eval`` stage and the loss every other stage measures with),
lm-evaluation-harness tasks, and generation speed."""

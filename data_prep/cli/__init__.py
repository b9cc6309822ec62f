"""Command-line entry points of the data jobs (console scripts ``nbp-train-tokenizer``, ``nbp-tokenize``,
``nbp-eval-tokenizer``; ``launchers/*.py`` call the same ``main``)."""

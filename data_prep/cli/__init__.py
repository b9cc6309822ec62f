"""Command-line entry points of the data jobs (console scripts ``nbp-train-tokenizer``, ``nbp-tokenize``;
``launchers/*.py`` call the same ``main``). The tokenizer's evaluation (``nbp-eval-tokenizer``) is
megatron_nbp.cli.eval_tokenizer: its FVD comes from megatron_nbp.eval, which data_prep never imports."""

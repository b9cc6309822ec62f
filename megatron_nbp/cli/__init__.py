"""Command-line entry points of the training, conversion, generation, evaluation and planning jobs
(console scripts ``nbp-pretrain``, ``nbp-convert``, ``nbp-generate``, ``nbp-evaluate``,
``nbp-plan-memory``, and ``nbp-eval-tokenizer``, here because its reconstruction FVD uses
megatron_nbp.eval; ``launchers/*.py`` call the same ``main``)."""

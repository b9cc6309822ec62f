"""Utilities shared by the data side (``data_prep``) and the training side (``megatron_nbp``).

Nothing here knows about NBP, video or megatron-core: durable file publishing (write to a temporary
name, fsync, rename, publish a pointer), content hashes, the base of the typed configs, the errors of
fetching files from a package registry, and leaving a training run early on a scheduler's signal
(:mod:`.exit_control`, used by NBP pretraining and tokenizer training). Both packages import from here;
this package imports neither.
"""

"""Evaluation: the Kinetics-400 I3D network and Frechet Video Distance (see docs/evaluation.md)."""

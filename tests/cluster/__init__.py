"""Tests of the Ray cluster backend: a two-node Ray cluster on this machine, inside a
loopback-only network namespace (see ray_harness.py)."""

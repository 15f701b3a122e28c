"""Parallelism plumbing: the device policy, process groups, and autograd collectives."""

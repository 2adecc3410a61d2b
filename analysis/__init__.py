"""Collect the runs of a sweep and compare arms at matched tokens."""

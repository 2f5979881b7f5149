"""Scoring candidates and computing metrics."""

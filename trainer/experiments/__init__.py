"""Runnable experiments from the case studies."""

"""Evaluation: POPE probes, answer parsing and metrics, greedy generation, preference accuracy (+ fit-vlm)."""

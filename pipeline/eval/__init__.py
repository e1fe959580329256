"""Evaluation flow: sweep / generate stages -> features (Inception) -> sweep_results -> fid, report.

`sweep_run` ties them into one run for the jobs.
"""

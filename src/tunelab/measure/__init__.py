"""Measuring strategies side by side: the memory planner (`tunelab.measure.plan`), the compare runner and reports.

Submodules are imported where they are used; this package imports nothing itself.
"""

"""Thin entrypoints submitted to clusters (`python -m jobs.X`) and the named run configs in jobs/configs/."""

"""The search driver: run/resume/status, the stores, the Ray session."""

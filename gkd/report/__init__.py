"""Reports of a run: JSON / Markdown summaries and plots."""

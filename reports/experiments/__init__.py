"""One-off measurements quoted in docs/ (``python -m reports.experiments.<name>``)."""

"""A trained tagger for others: the MLflow pyfunc model (pyfunc, pyfunc_code) and tagging audio
files with it (tag)."""

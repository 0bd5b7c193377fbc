"""Scores and their uncertainty: the tagging metrics (tagging) and the intervals and paired
verdicts over clips and seeds (stats). numpy only; imports nothing above mtt.core."""

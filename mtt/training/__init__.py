"""One run: the checks before any work (preflight), the training loop (train), clip-level
evaluation (evaluate), learning-rate phases (schedule), the frozen-backbone cache
(backbone_cache) and the linear-probe reference (probe)."""

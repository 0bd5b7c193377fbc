"""mtt: experiment tracking for music auto-tagging on MagnaTagATune with a PyTorch VGGish."""

__version__ = "0.1.0"

"""The ground floor: files written atomically (fs), repository paths, the component registries
and config rules (components), HTTP downloads (fetch), the torch.distributed helpers. It imports
nothing else from mtt."""

"""VAE training pipeline: ELBO objectives, WebDataset streaming, Lightning DDP, W&B, SLURM."""
__version__ = "0.1.0"

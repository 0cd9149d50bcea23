"""The model and its mathematics, free of Lightning and of files: pure functions where it can be.

    objectives    ELBO terms (Bernoulli and Gaussian likelihoods, analytic KL, IWAE) in nats
    schedules     KL weight over steps: warm-up, cyclical, capacity, free bits
    model         the encoder / decoder networks (MLP, conv) and ModelConfig
    disentangle   mutual information gap (MIG)
    metrics       exact evaluation sums over a split (ExactSums), active units
    grids         image grids: reconstructions, prior samples, latent traversals
    scores        DCI, FactorVAE and SAP disentanglement scores
"""

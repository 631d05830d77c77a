"""nas: block-wise weight-sharing neural architecture search (DNA, BossNAS, Pi-NAS, MLP search)."""

"""MM-LDM (issue 17): hierarchical multi-modal autoencoder + DiT for sounding video, on cached features."""

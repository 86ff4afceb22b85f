"""CMMD (issue 16): joint video-audio diffusion on cached features."""

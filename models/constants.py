"""Constants of the model modules that stage and asset modules need at import time (dataclass and
config defaults, direction indices). They live here, without torch, so that loading the Dagster
definitions does not import torch; each model module imports and re-exports its own."""

# models.vae: images per encode / decode call on CPU; a GPU takes more (models.devices.fitting_batch).
# On CPU batch 16 measured fastest (encode 463 images/s vs 379 at 64, decode 212 vs 140;
# bench/bench_vae.py), larger batches fall out of cache.
DEFAULT_BATCH = 16

# models.towers: FrameTower input side in pixels. Demo frames are 64x64. A linear probe is as good at
# 64 as at 224 (colour and shape suffice), but at 64 the net ends on a 2x2 grid and its features are
# far from those of a native-size input (cosine 0.55 to the 224 px features; 0.74 at 128). 128 costs
# about what the audio tower costs per clip (~10 clips/s per core at 4 fps), 160 / 224 cost 1.8x / 5x
# more for no probe gain.
DEFAULT_FRAME_SIZE = 128

# models.diffgap: the denoiser's direction index.
TO_AUDIO, FROM_AUDIO = 0, 1

# models.vocoder: the mel spectrogram the HiFi-GAN vocoder expects.
SAMPLE_RATE = 22050
N_MELS = 80
HOP_LENGTH = 256
N_FFT = 1024
FMIN = 0.0
FMAX = 8000.0

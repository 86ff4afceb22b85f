"""Efficiency of MM-LDM (issue 17, as the paper's Table 2, on CPU): training step time, sampling time
and activation memory per sample, MM-LDM against a signal-space baseline of the same DiT.

  signal-space baseline   the same JointDiT (width, depth) over the signals at the demo's size:
                          the grayscale audio image 80 x 352 in 8 x 8 patches (440 tokens) and the
                          16 RGB frames 64 x 64 in 1 x 8 x 8 patches (1024 tokens); no autoencoder
  MM-LDM                  one training step as the paper times it: the KL-VAE encoders (audio image,
                          16 frames), the multi-modal encoders, then the DiT step (176 tokens)
  MM-LDM*                 the DiT step alone on cached latents (``mmldm_latents``): what train_mmldm runs

Sampling one clip: 50 DDIM steps of the DiT; MM-LDM adds its decoding (the signal decoder at 25
DDIM steps for the audio image and each of 16 frames, then the KL-VAE decoders). Memory: bytes of
the tensors autograd saves for backward in one training forward pass, per sample (the activations a
GPU must hold; the largest batch that fits follows from it and the GPU's memory, not measured here).
Shapes are the demo's; weights do not change the speed, so models are freshly initialised.
Interleaved repeats, medians; ratios to the baseline. No asserts.

    .venv/bin/python bench/bench_mmldm.py [--repeats 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="clips per training step")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--decoder-steps", type=int, default=25)
    args = parser.parse_args()

    import torch

    from models.mmldm import AutoencoderConfig, DitConfig, build_autoencoder, build_dit, decode_clips, dit_loss, make_scheduler, sample_dit
    from models.vae import VaeConfig, build_vae

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b = args.batch
    scheduler = make_scheduler(1000, "scaled_linear")
    baseline = build_dit(DitConfig(audio_shape=(1, 80, 352), video_shape=(3, 16, 64, 64), audio_patch=(8, 8), video_patch=(1, 8, 8)))
    dit = build_dit(DitConfig())
    autoencoder = build_autoencoder(AutoencoderConfig(classes=6)).eval()
    audio_vae = build_vae(VaeConfig(block_out_channels=(16, 32, 64, 64), latent_channels=4, norm_num_groups=4)).eval()
    frame_vae = build_vae(VaeConfig(block_out_channels=(16, 32, 64), latent_channels=4, norm_num_groups=4)).eval()
    signal = (torch.randn(b, 1, 80, 352), torch.randn(b, 3, 16, 64, 64))
    images = (torch.randn(b, 3, 80, 352), torch.randn(b * 16, 3, 64, 64))
    latents = (torch.randn(b, 8, 5, 22), torch.randn(b, 8, 8, 8))
    opt_base = torch.optim.AdamW(baseline.parameters(), 1e-4)
    opt_dit = torch.optim.AdamW(dit.parameters(), 1e-4)

    def step(model, optimizer, z_a, z_v):
        loss = dit_loss(model, scheduler, z_a, z_v, torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def encode():
        with torch.no_grad():
            x_a = audio_vae.encode(images[0]).latent_dist.mean
            x_v = frame_vae.encode(images[1]).latent_dist.mean.reshape(b, 16, 4, 16, 16)
            (mu_a, _), (mu_v, _) = autoencoder.encode(x_a, x_v)
        return mu_a, mu_v

    train = {
        "signal-space baseline": lambda: step(baseline, opt_base, *signal),
        "MM-LDM (encoders + DiT)": lambda: step(dit, opt_dit, *encode()),
        "MM-LDM* (cached latents)": lambda: step(dit, opt_dit, *latents),
    }

    def sample_baseline():
        sample_dit(baseline, scheduler, 1, "joint", steps=args.ddim_steps, generator=torch.Generator().manual_seed(0))

    def sample_mmldm(decode: bool):
        def run():
            z_a, z_v = sample_dit(dit, scheduler, 1, "joint", steps=args.ddim_steps, generator=torch.Generator().manual_seed(0))
            if decode:
                with torch.no_grad():
                    x_a, x_v = decode_clips(autoencoder, scheduler, z_a, z_v, args.decoder_steps, torch.Generator().manual_seed(0))
                    audio_vae.decode(x_a)
                    frame_vae.decode(x_v.flatten(0, 1))
        return run

    sample = {"signal-space baseline (sampling)": sample_baseline, "MM-LDM (DiT + decoding)": sample_mmldm(True), "MM-LDM* (DiT alone)": sample_mmldm(False)}

    def activation_bytes(fn) -> int:
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return total[0]

    memory = {
        "signal-space baseline": activation_bytes(lambda: dit_loss(baseline, scheduler, *signal, torch.Generator().manual_seed(0))),
        "MM-LDM* (cached latents)": activation_bytes(lambda: dit_loss(dit, scheduler, *latents, torch.Generator().manual_seed(0))),
    }
    memory["MM-LDM (encoders + DiT)"] = memory["MM-LDM* (cached latents)"]  # the encoders run without grad

    times = {name: [] for name in [*train, *sample]}
    for fn in [*train.values(), *sample.values()]:
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in [*train.items(), *sample.items()]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"# bench_mmldm: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch {b}, {args.repeats} repeats (medians)")
    print(f"# DiT {params(dit):.2f} M parameters (176 tokens); baseline DiT {params(baseline):.2f} M (1466 tokens); "
          f"autoencoder {params(autoencoder):.2f} M")
    base = statistics.median(times["signal-space baseline"])
    print("\n| training step | s / step | s / sample | vs baseline | activations / sample |")
    print("|---|---:|---:|---:|---:|")
    for name in train:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {t / b:.4f} | {t / base:.2f}x | {memory[name] / b / 2**20:.1f} MiB |")
    print(f"\n| sampling one clip ({args.ddim_steps} DDIM steps) | s / clip | vs baseline |")
    print("|---|---:|---:|")
    sample_base = statistics.median(times["signal-space baseline (sampling)"])
    for name in sample:
        t = statistics.median(times[name])
        print(f"| {name.replace(' (sampling)', '')} | {t:.3f} | {t / sample_base:.2f}x |")


if __name__ == "__main__":
    main()

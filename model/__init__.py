"""The STDiT2 (Open-Sora 1.1) video diffusion model and its encoders: not built yet."""

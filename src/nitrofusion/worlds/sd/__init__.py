"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline folders: epsilon or v-prediction, 512 or 768 px). This
folder holds what differs from SDXL: the config section (config.py), the training calls (adapter.py: one CLIP
text encoder, no pooled embedding or micro-conditioning) and the World (world.py). Inference, export, the fast
path and evaluation are the SDXL folder's UNet-pipeline machinery, which reads a folder's family from what
diffusers wrote in it (worlds/sdxl/family.py)."""

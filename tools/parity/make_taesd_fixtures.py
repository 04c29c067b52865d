"""Golden for the tiny autoencoder's decoder (previews): a random diffusers AutoencoderTiny with the
real block structure at small width, and its decode of random latents.

python tools/parity/make_taesd_fixtures.py --out tests/fixtures/taesd
"""
import argparse
import os

import torch
from diffusers import AutoencoderTiny
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/taesd")
    a = ap.parse_args()
    torch.manual_seed(0)
    m = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(16, 16, 16, 16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    m.save_pretrained(a.out, safe_serialization=True)
    z = torch.randn(1, 4, 6, 5) * 2
    with torch.no_grad():
        img = m.decode(z).sample
    save_file({"latents": z.contiguous(), "image": img.contiguous()}, os.path.join(a.out, "golden.safetensors"))
    print(img.shape)


if __name__ == "__main__":
    main()

"""Prints the DiT variant table (params, Gflops): `python -m dit_jax.models`."""
import argparse

from dit_jax.models.flops import variant_table


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--image-sizes", type=int, nargs="+", default=[256, 512],
                      help="image sizes in pixels (latent = size / 8)")
  args = parser.parse_args()
  print(variant_table(tuple(args.image_sizes)))


if __name__ == "__main__":
  main()

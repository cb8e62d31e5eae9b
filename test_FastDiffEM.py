"""Blind deblurring with Fast Diffusion EM (see README). `python test_FastDiffEM.py --help`."""
import sys

from diffusion_em.run import main

if __name__ == "__main__":
    sys.exit(main(method="fast_em"))

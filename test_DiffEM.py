"""Blind deblurring with Diffusion EM (see README). `python test_DiffEM.py --help`."""
import sys

from diffusion_em.run import main

if __name__ == "__main__":
    sys.exit(main(method="diffusion_em"))

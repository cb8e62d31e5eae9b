#!/usr/bin/env python3
"""Screen settings of the classical ℓ0 blind method (classical.blind_l0.L0Config) on 4 BSDS500 *train* crops with
Levin kernels (σ 5/10/20/255): mean kernel MSE and, per case, aligned PSNR of Tikhonov (λ=0.03) with the estimate
minus with the true kernel. Usage: python bench/tune_l0.py '[{"gamma": 30, "threshold": 0.15}, ...]'"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataclasses import replace
torch.set_num_threads(1)
from classical.blind_l0 import estimate_kernel, L0Config
from classical import nonblind as NB
from util.fft import conv_circular
from util.metrics import kernel_mse, psnr, aligned_scores
from util.images import read_image
DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
rng = np.random.default_rng(0)
files = sorted(os.listdir(str(DATA) + '/bsds500/train'))
cases = [(files[3], 2, 5), (files[10], 4, 10), (files[20], 7, 20), (files[30], 5, 10)]
variants = json.loads(sys.argv[1])
for v in variants:
    cfg = replace(L0Config(), **v)
    res = []
    t = time.time()
    for f, kid, s255 in cases:
        img = read_image(str(DATA) + '/bsds500/train/' + f, clip=True)[:256, :256]
        kk = np.load(str(DATA) + '/kernels/levin09/levin_%d.npy' % kid).astype(np.float64)
        xt = torch.from_numpy(img.transpose(2,0,1).astype(np.float64))
        y = conv_circular(xt, torch.from_numpy(kk)) + torch.from_numpy(np.random.default_rng(kid).normal(0, s255/255, xt.shape))
        ke = estimate_kernel(y, 33, cfg)
        lam = NB.tikhonov_lambda(s255/255)
        pe = aligned_scores(NB.tikhonov(y, ke, 0.03), xt, 33)["psnr_aligned"]
        pt = aligned_scores(NB.tikhonov(y, torch.from_numpy(kk), 0.03), xt, 33)["psnr_aligned"]
        res.append((kernel_mse(ke.numpy(), kk)[0], pe - pt))
    r = np.array(res)
    print(v, "time %.1f" % (time.time() - t), "kmse %.2e" % r[:, 0].mean(), "dpsnr", np.round(r[:, 1], 2), flush=True)

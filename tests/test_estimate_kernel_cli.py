"""`python -m diffusion_em.estimate_kernel` given careless flags: one-line errors naming --out/--device and the
file, refused before any work, and no input or unrelated file replaced (32×32 PNGs, a 5×5 kernel, one M-step call).
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_em.estimate_kernel import main


@pytest.fixture
def pair(tmp_path):
    """(sharp a.png, blurry b.png): a random 32×32 texture and its circular blur by a 5×5 box."""
    rng = np.random.default_rng(0)
    x = rng.random((32, 32, 3))
    k = np.ones((5, 5)) / 25
    y = np.stack([np.real(np.fft.ifft2(np.fft.fft2(x[:, :, c]) * np.fft.fft2(k, s=(32, 32)))) for c in range(3)], -1)
    sharp, blurry = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray((x * 255).round().astype(np.uint8)).save(sharp)
    Image.fromarray((np.clip(y, 0, 1) * 255).round().astype(np.uint8)).save(blurry)
    return sharp, blurry


def _run(pair, out, *extra) -> int:
    sharp, blurry = pair
    return main(["--sharp", str(sharp), "--blurry", str(blurry), "--sigma", "0.01", "--kernel_size", "5",
                 "--calls", "1", "--J", "2", "--denoiser", "none", "--out", str(out), *extra])


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_out_beside_the_sharp_png_would_replace_it_and_is_refused(pair, capsys):
    """--out a.npy with --sharp a.png wrote the preview a.png over the user's sharp image."""
    sharp, blurry = pair
    before = _files(sharp.parent)
    assert _run(pair, sharp.with_suffix(".npy")) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out {sharp.with_suffix('.npy')}" in err and f"--sharp input {sharp}" in err
    assert _files(sharp.parent) == before  # nothing written, the input untouched
    assert _run(pair, blurry.with_suffix("")) == 2  # --out b: b.png is the --blurry input
    assert "--blurry input" in _one_line(capsys.readouterr().err) and _files(sharp.parent) == before


def test_an_unrelated_image_or_array_under_an_output_name_is_not_replaced(pair, tmp_path, capsys):
    photo = tmp_path / "c.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
    np.save(tmp_path / "d.npy", np.zeros((4, 8, 3), np.float32))
    before = _files(tmp_path)
    assert _run(pair, tmp_path / "c.npy") == 2
    assert f"{photo} exists and is not a kernel preview" in _one_line(capsys.readouterr().err)
    assert _run(pair, tmp_path / "d.png") == 2
    assert "is not a kernel (an array of shape (4, 8, 3) and type float32)" in _one_line(capsys.readouterr().err)
    assert _files(tmp_path) == before


def test_any_out_suffix_keeps_the_kernel_array_and_a_rerun_replaces_its_own(pair, tmp_path, capsys):
    """--out k.png wrote k.npy and then its preview over... k.png itself ("wrote k.png and k.png"): the kernel was lost;
    --out k wrote the array to a file named 'k'. The documented --out k.npy keeps writing k.npy + k.png."""
    for name in ("k.png", "k", "k.npy"):
        out = tmp_path / name.replace(".", "_")
        for _ in range(2):  # the second run replaces the first one's kernel and preview (documented: a rerun)
            assert _run(pair, out / name) == 0
            assert f"wrote {out / 'k.npy'} and {out / 'k.png'}" in capsys.readouterr().out
            assert sorted(p.name for p in out.iterdir()) == ["k.npy", "k.png"]
            k = np.load(out / "k.npy")
            assert k.shape == (5, 5) and k.dtype == np.float32 and k.sum() == pytest.approx(1, abs=1e-5)
            with Image.open(out / "k.png") as im:
                assert im.mode == "L" and im.size[0] == im.size[1] > 5


def _missing_device() -> str:
    have = torch.accelerator.current_accelerator().type if torch.accelerator.is_available() else None
    return "mps" if have == "cuda" else "cuda"


@pytest.mark.parametrize("device", ["bogus", _missing_device()])
def test_a_device_that_does_not_exist_is_one_line_before_any_work(pair, tmp_path, device, capsys):
    """--device bogus raised a RuntimeError traceback, --device cuda without CUDA an AssertionError."""
    before = _files(tmp_path)
    assert _run(pair, tmp_path / "k.npy", "--device", device) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"estimate_kernel: error: --device {device}: ")
    assert _files(tmp_path) == before


def test_out_that_is_a_folder_or_under_a_file_names_the_flag_not_a_temp_file(pair, tmp_path, capsys):
    """--out EXISTING_FOLDER said "Is a directory: '.../.ek.XXXX.tmp' -> '.../ek'"."""
    folder = tmp_path / "ek"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    assert _run(pair, folder) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out {folder}: names a folder" in err and ".tmp" not in err
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
    assert _run(pair, pair[0] / "k.npy") == 2  # under the sharp image (a file)
    assert f"--out {pair[0] / 'k.npy'}: {pair[0]} is a file, not a folder" in _one_line(capsys.readouterr().err)


def test_a_grey_square_photo_or_a_float_array_under_an_output_name_is_not_replaced(pair, tmp_path, capsys):
    """Any mode-L square PNG and any square 2-D .npy passed for an earlier output: a 512×512 grey scan was replaced."""
    Image.fromarray(np.full((512, 512), 90, np.uint8)).save(tmp_path / "scan.png")
    np.save(tmp_path / "scan.npy", np.full((64, 64), 0.5, np.float32))  # square, float32, but no kernel (sum 2048)
    before = _files(tmp_path)
    assert _run(pair, tmp_path / "scan") == 2
    assert "scan.npy exists and is not a kernel" in _one_line(capsys.readouterr().err)
    np.save(tmp_path / "scan.npy", np.full((5, 5), 0.04, np.float32))  # a kernel of ours: its preview must match it
    before = _files(tmp_path)
    assert _run(pair, tmp_path / "scan") == 2
    assert "scan.png exists and is not a kernel preview (a 512x512 L image)" in _one_line(capsys.readouterr().err)
    assert _files(tmp_path) == before


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
def test_a_fifo_under_an_output_name_is_refused_not_opened(pair, tmp_path, capsys):
    """Opening a FIFO to see whether it was an earlier output blocked forever."""
    os.mkfifo(tmp_path / "k.npy")
    assert _run(pair, tmp_path / "k") == 2
    assert "k.npy exists and is not a regular file" in _one_line(capsys.readouterr().err)


def test_absurd_thread_counts_are_one_line_errors(pair, tmp_path, capsys):
    assert _run(pair, tmp_path / "k", "--threads", "100000") == 2
    assert "--threads 100000: must be in [1, " in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "k.npy").exists()


def test_an_npz_archive_under_the_kernel_name_is_refused_in_one_line(pair, tmp_path, capsys):
    """np.load of a .npz under k.npy returned an archive, and reading its dtype was a traceback."""
    with open(tmp_path / "k.npy", "wb") as f:
        np.savez(f, a=np.zeros(3))
    assert _run(pair, tmp_path / "k") == 2
    assert "k.npy exists and is not a kernel (not a .npy array)" in _one_line(capsys.readouterr().err)


def test_a_large_kernel_of_ours_is_replaced_on_a_rerun(pair, tmp_path, capsys):
    """The first fix refused its own kernels above 256 taps; any float32 square kernel summing to 1 is one of ours."""
    np.save(tmp_path / "k.npy", np.full((301, 301), 1 / 301 ** 2, np.float32))
    assert _run(pair, tmp_path / "k") == 0
    assert np.load(tmp_path / "k.npy").shape == (5, 5)


def test_a_run_stopped_between_its_two_files_does_not_block_the_rerun(pair, tmp_path, monkeypatch, capsys):
    """A run stopped after its first file (a full disk, a kill) left one new file beside one old one of another size;
    the rerun then refused the preview as "not a kernel preview" and could not replace its own files."""
    import diffusion_em.estimate_kernel as ek
    out = tmp_path / "k.npy"
    assert _run(pair, out) == 0  # 5×5 kernel and its preview
    calls = []

    def second_write_fails(real):
        def write(*a, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise OSError(28, "No space left on device")
            return real(*a, **kw)
        return write
    monkeypatch.setattr(ek, "save_npy", second_write_fails(ek.save_npy))
    monkeypatch.setattr(ek, "save_kernel_png", second_write_fails(ek.save_kernel_png))
    assert _run(pair, out, "--kernel_size", "7") == 2 and len(calls) == 2
    monkeypatch.undo()
    capsys.readouterr()
    assert _run(pair, out, "--kernel_size", "7") == 0, capsys.readouterr().err
    assert np.load(tmp_path / "k.npy").shape == (7, 7)
    with Image.open(tmp_path / "k.png") as im:
        assert im.size == (7 * (256 // 7),) * 2
    (tmp_path / "k.npy").unlink()  # a first run stopped after its preview: the preview alone, rerun accepted
    assert _run(pair, out, "--kernel_size", "7") == 0, capsys.readouterr().err
    (tmp_path / "k.npy").unlink()  # ... but not a preview of another size with no kernel beside it
    before = _files(tmp_path)
    assert _run(pair, out, "--kernel_size", "5") == 2  # a 255-px preview, not 252
    assert "k.png exists and is not a kernel preview" in _one_line(capsys.readouterr().err)
    assert _files(tmp_path) == before

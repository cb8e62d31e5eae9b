"""util/cpu_memory.py: glibc keeps freed memory for reuse (no page faults in every UNet call), and hands it back
after an out-of-memory failure."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux only)")


def _run(code: str, root, *args) -> str:
    r = subprocess.run([sys.executable, "-c", code.format(root=str(root)), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "refused":
        pytest.skip("this C library refused the thresholds (not glibc)")
    return r.stdout


def _huge_pages_always() -> bool:
    """Transparent huge pages on every anonymous mapping: a fresh block then faults per 2 MiB, not per 4 KiB."""
    try:
        return "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


_FAULTS = """
import resource, sys, torch
sys.path.insert(0, {root!r})
from util.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    print("refused")
    sys.exit(0)
torch.set_num_threads(1)
faults = []
for _ in range(3):
    a = torch.empty(40 * 2**20, dtype=torch.uint8).fill_(1)  # above glibc's largest automatic mmap threshold
    del a
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    b = torch.empty(30 * 2**20, dtype=torch.uint8).fill_(1)  # fits in the block just freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    del b
print(faults[0], max(faults))
"""


def test_keep_freed_memory_reuses_freed_blocks_without_page_faults(repo_root):
    """Under glibc's defaults a freed 40 MiB block goes back to the system and the next 30 MiB tensor is
    page-faulted in anew; once util.cpu_memory.keep_freed_memory has run it reuses the freed block."""
    def faults(mode):
        first, most = map(int, _run(_FAULTS, repo_root, mode).split()[-2:])
        return first, most
    pages = 30 * 2**20 // 4096
    if not _huge_pages_always():
        assert faults("default")[0] > 0.5 * pages
    assert faults("keep")[1] < 0.02 * pages


_RSS = """
import sys, torch
sys.path.insert(0, {root!r})
from util.cpu_memory import keep_freed_memory, release_freed_memory
def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
if not keep_freed_memory():
    print("refused")
    sys.exit(0)
base = rss_mb()
a = torch.empty(120 * 2**20, dtype=torch.uint8).fill_(1)
del a
kept = rss_mb()
release_freed_memory()
print(round(kept - base), round(rss_mb() - base))
"""


def test_release_freed_memory_hands_kept_memory_back(repo_root):
    """With freed memory kept, a freed 120 MiB tensor stays resident; release_freed_memory (what the runner calls
    after an image ran out of memory) returns it to the system."""
    kept, released = map(int, _run(_RSS, repo_root).split()[-2:])
    assert kept > 100 and released < 20


@pytest.mark.parametrize("malloc, expected", [("keep", 1), ("default", 0)])
def test_runner_sets_the_allocator_only_when_asked(tmp_path, monkeypatch, malloc, expected):
    """`--malloc default` leaves glibc's thresholds alone (a user short of memory on large photos); `keep`, the
    default, sets them once, before anything is read."""
    import diffusion_em.run as run
    calls = []
    monkeypatch.setattr(run, "keep_freed_memory", lambda: calls.append(1) or True)
    rc = run.main(["--input_dir", str(tmp_path / "missing"), "--save_dir", str(tmp_path / "out"), "--device", "cpu",
                   "--malloc", malloc])
    assert rc != 0  # the folder does not exist: an error, after the setting
    assert len(calls) == expected
